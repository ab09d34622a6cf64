//! The OCI (and Docker schema 2) documents an import reads: index, manifest, config.
//!
//! Parsed permissively (registries add fields), then checked for what an import relies on:
//! digests of the right form, sizes, known media types, and a config whose `diff_ids` name
//! every layer.

use std::collections::BTreeMap;

use serde::Deserialize;

use mvm_ir::digest::is_prefixed_sha256;

use super::OciError;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The media types a registry is asked for.
#[cfg(feature = "registry")]
pub(crate) const ACCEPTED_MANIFEST_TYPES: &[&str] =
    &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// A platform of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaKind {
    Tar,
    TarGzip,
    TarZstd,
}

impl Descriptor {
    fn check(&self, what: &'static str) -> Result<(), OciError> {
        if !is_prefixed_sha256(&self.digest) {
            return Err(OciError::BadDocument {
                what,
                reason: format!("digest {:?} is not sha256:<64 hex>", self.digest),
            });
        }
        Ok(())
    }

    /// The layer's compression, from its media type.
    pub(crate) fn layer_kind(&self) -> Result<MediaKind, OciError> {
        match self.media_type.as_str() {
            "application/vnd.oci.image.layer.v1.tar" => Ok(MediaKind::Tar),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(MediaKind::TarGzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(MediaKind::TarZstd),
            other => Err(OciError::UnsupportedMediaType {
                digest: self.digest.clone(),
                media_type: other.to_string(),
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Document {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// An image manifest.
#[derive(Debug)]
pub(crate) struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image index.
#[derive(Debug)]
pub(crate) struct Index {
    pub manifests: Vec<Descriptor>,
}

/// What a digest named.
#[derive(Debug)]
pub(crate) enum Top {
    Manifest(Manifest),
    Index(Index),
}

/// Parses the document `digest` names (already verified to hash to it).
pub(crate) fn parse_top(bytes: &[u8], digest: &str) -> Result<Top, OciError> {
    let bad = |reason: String| OciError::BadDocument {
        what: "manifest",
        reason: format!("{digest}: {reason}"),
    };
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if doc.schema_version != 2 {
        return Err(bad(format!(
            "schemaVersion {} is not 2",
            doc.schema_version
        )));
    }
    let is_index = match doc.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => {
            return Err(bad(format!(
                "media type {other} is not an image manifest or index"
            )))
        }
        // OCI allows the field to be absent: tell by the content.
        None => doc.manifests.is_some(),
    };
    if is_index {
        let manifests = doc
            .manifests
            .ok_or_else(|| bad("an index without manifests".into()))?;
        for m in &manifests {
            m.check("image index")?;
        }
        return Ok(Top::Index(Index { manifests }));
    }
    let config = doc
        .config
        .ok_or_else(|| bad("a manifest without config".into()))?;
    config.check("image manifest")?;
    let layers = doc
        .layers
        .ok_or_else(|| bad("a manifest without layers".into()))?;
    for layer in &layers {
        layer.check("image manifest")?;
    }
    Ok(Top::Manifest(Manifest { config, layers }))
}

impl Index {
    /// The `linux/amd64` manifest.
    pub(crate) fn linux_amd64(&self) -> Result<&Descriptor, OciError> {
        self.manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| {
                let found: Vec<String> = self
                    .manifests
                    .iter()
                    .map(|m| {
                        m.platform
                            .as_ref()
                            .map_or("unknown".into(), |p| format!("{}/{}", p.os, p.architecture))
                    })
                    .collect();
                OciError::NoMatchingPlatform(found.join(", "))
            })
    }
}

/// What the runtime needs from an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RuntimeConfig {
    /// `KEY=VALUE` environment.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// The entrypoint argv.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// The default arguments.
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// The working directory.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// The user.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    /// The image's labels (recorded in the provenance; they change nothing at run time).
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// The ports the image declares (`80/tcp`), recorded in the provenance; nothing is forwarded
    /// unless the workload grants it.
    #[serde(rename = "ExposedPorts", default, deserialize_with = "set_keys")]
    pub exposed_ports: Vec<String>,
}

/// The keys of a JSON object whose values are empty objects (Go's `map[string]struct{}`), as
/// `ExposedPorts` is written; `null` or absent is empty.
fn set_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let map: Option<BTreeMap<String, serde::de::IgnoredAny>> = Option::deserialize(d)?;
    Ok(map.map(|m| m.into_keys().collect()).unwrap_or_default())
}

/// An image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `amd64`.
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// The runtime defaults.
    pub runtime: RuntimeConfig,
    /// Digests of the uncompressed layers, bottom first.
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, OciError> {
        #[derive(Deserialize)]
        struct RootFs {
            #[serde(rename = "type")]
            kind: String,
            diff_ids: Vec<String>,
        }
        #[derive(Deserialize)]
        struct Raw {
            architecture: String,
            os: String,
            #[serde(default)]
            config: Option<RuntimeConfig>,
            rootfs: RootFs,
        }
        let bad = |reason: String| OciError::BadDocument {
            what: "image config",
            reason,
        };
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if raw.rootfs.kind != "layers" {
            return Err(bad(format!(
                "rootfs type {:?} is not \"layers\"",
                raw.rootfs.kind
            )));
        }
        if let Some(d) = raw.rootfs.diff_ids.iter().find(|d| !is_prefixed_sha256(d)) {
            return Err(bad(format!("diff_id {d:?} is not sha256:<64 hex>")));
        }
        if raw.os != "linux" || raw.architecture != "amd64" {
            return Err(OciError::NoMatchingPlatform(format!(
                "{}/{}",
                raw.os, raw.architecture
            )));
        }
        Ok(Self {
            architecture: raw.architecture,
            os: raw.os,
            runtime: raw.config.unwrap_or_default(),
            diff_ids: raw.rootfs.diff_ids,
        })
    }
}
