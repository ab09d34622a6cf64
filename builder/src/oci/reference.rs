//! Image references: a transport (registry, `oci:DIR`, `oci-archive:FILE`) and the manifest
//! digest that pins the image.

use std::fmt;
use std::path::{Path, PathBuf};

use mvm_ir::digest::is_prefixed_sha256;

use super::OciError;

/// Where an image is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A registry over the OCI distribution API.
    Registry {
        /// `host[:port]`.
        registry: String,
        /// The repository path, e.g. `library/busybox`.
        repository: String,
    },
    /// An OCI image layout directory.
    Layout(PathBuf),
    /// A tar archive of an OCI image layout.
    Archive(PathBuf),
}

/// An image, pinned by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Where it is read from.
    pub transport: Transport,
    /// `sha256:` digest of its manifest or index.
    pub digest: String,
}

impl ImageRef {
    /// The image `reference` (as a workload's `oci_base.reference` spells it) pinned to
    /// `digest`. Relative `oci:`/`oci-archive:` paths are taken relative to `base`.
    pub fn new(reference: &str, digest: &str, base: &Path) -> Result<Self, OciError> {
        let bad = |reason: &str| OciError::BadReference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if !is_prefixed_sha256(digest) {
            return Err(bad("the digest is not sha256:<64 hex>"));
        }
        let transport = if let Some(dir) = reference.strip_prefix("oci:") {
            Transport::Layout(local_path(dir, base).ok_or_else(|| bad("oci: needs a directory"))?)
        } else if let Some(file) = reference.strip_prefix("oci-archive:") {
            Transport::Archive(
                local_path(file, base).ok_or_else(|| bad("oci-archive: needs a file"))?,
            )
        } else {
            let name = match reference.split_once('@') {
                Some((name, pinned)) if pinned == digest => name,
                Some(_) => return Err(bad("the reference is pinned to another digest")),
                None => reference,
            };
            let (registry, repository) = name
                .split_once('/')
                .ok_or_else(|| bad("name the registry: HOST[:PORT]/REPOSITORY"))?;
            let looks_like_host =
                registry.contains('.') || registry.contains(':') || registry == "localhost";
            if !looks_like_host {
                return Err(bad("name the registry: HOST[:PORT]/REPOSITORY"));
            }
            if repository
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'))
            {
                return Err(bad("tags are not accepted: pin the image by digest"));
            }
            Transport::Registry {
                registry: registry.to_string(),
                repository: repository.to_string(),
            }
        };
        Ok(Self {
            transport,
            digest: digest.to_string(),
        })
    }

    /// Parses `REFERENCE@sha256:<hex>` as typed on a command line.
    pub fn parse_pinned(text: &str, base: &Path) -> Result<Self, OciError> {
        let (reference, digest) = text
            .rsplit_once('@')
            .ok_or_else(|| OciError::BadReference {
                reference: text.to_string(),
                reason: "not pinned: write REFERENCE@sha256:<digest>".into(),
            })?;
        Self::new(reference, digest, base)
    }
}

fn local_path(path: &str, base: &Path) -> Option<PathBuf> {
    if path.is_empty() {
        return None;
    }
    let path = Path::new(path);
    Some(if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    })
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Registry {
                registry,
                repository,
            } => write!(f, "{registry}/{repository}@{}", self.digest),
            Transport::Layout(dir) => write!(f, "oci:{}@{}", dir.display(), self.digest),
            Transport::Archive(file) => write!(f, "oci-archive:{}@{}", file.display(), self.digest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_ir::Coded;

    const D: &str = "sha256:9e2bbca079387d7965c3a9cee6d0c53f4f4e63ff7637877a83c4c05f2a666112";

    #[test]
    fn transports_and_refusals() {
        let base = Path::new("/work");
        let r = ImageRef::new("127.0.0.1:5000/library/busybox", D, base).unwrap();
        assert_eq!(
            r.transport,
            Transport::Registry {
                registry: "127.0.0.1:5000".into(),
                repository: "library/busybox".into()
            }
        );
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/library/busybox@{D}"));
        assert_eq!(
            ImageRef::new("oci:img", D, base).unwrap().transport,
            Transport::Layout("/work/img".into())
        );
        assert_eq!(
            ImageRef::new("oci-archive:/a.tar", D, base)
                .unwrap()
                .transport,
            Transport::Archive("/a.tar".into())
        );
        assert!(ImageRef::new(&format!("127.0.0.1:5000/busybox@{D}"), D, base).is_ok());
        for bad in [
            "busybox",
            "docker.io/busybox:latest",
            "oci:",
            "127.0.0.1:5000/b@sha256:00",
        ] {
            assert_eq!(
                ImageRef::new(bad, D, base).unwrap_err().code(),
                "OCI001",
                "{bad}"
            );
        }
        assert!(ImageRef::parse_pinned(&format!("127.0.0.1:5000/busybox@{D}"), base).is_ok());
        assert_eq!(
            ImageRef::parse_pinned("127.0.0.1:5000/busybox:1.36", base)
                .unwrap_err()
                .code(),
            "OCI001"
        );
    }
}
