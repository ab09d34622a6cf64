//! The per-VM CA the host gives the guest ([`mvm_protocol::Request::TrustCa`]): the host's
//! egress side presents certificates from it for the hosts a launch's secrets are bound to,
//! so the guest's TLS clients must accept it.
//!
//! The agent writes the certificate alone (`ca.pem`, for Node's `NODE_EXTRA_CA_CERTS`) and a
//! bundle of the image's own CAs (kept as `image-cas.pem`) and it (`ca-bundle.pem`) into its
//! trust directory, and puts
//! the bundle in place of the system bundle when the image has one (in the root's writable
//! overlay; the verified image below is untouched), so that clients which read only the
//! system's store trust it too. Commands started afterwards get the variables the common
//! TLS stacks read ([`environment`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use mvm_protocol::{codes, ErrorReply};

/// The largest certificate taken.
const MAX_PEM: usize = 16 * 1024;

/// Where the trusted CA goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPaths {
    /// The directory of `ca.pem` and `ca-bundle.pem`.
    pub dir: PathBuf,
    /// The image's system bundle, replaced by the bundle when it exists.
    pub system_bundle: Option<PathBuf>,
}

impl TrustPaths {
    /// The guest's: `/etc/mvm`, and Debian's system bundle.
    pub fn guest() -> Self {
        Self {
            dir: PathBuf::from("/etc/mvm"),
            system_bundle: Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn bundle(&self) -> PathBuf {
        self.dir.join("ca-bundle.pem")
    }

    fn image_cas(&self) -> PathBuf {
        self.dir.join("image-cas.pem")
    }
}

/// Trusts `pem`, one PEM certificate.
pub fn trust(pem: &str, paths: &TrustPaths) -> Result<(), ErrorReply> {
    let refused = |message: String| ErrorReply {
        code: codes::BAD_REQUEST.into(),
        message,
    };
    let one_certificate = pem.len() <= MAX_PEM
        && pem.is_ascii()
        && pem.trim_start().starts_with("-----BEGIN CERTIFICATE-----")
        && pem.trim_end().ends_with("-----END CERTIFICATE-----")
        && pem.matches("-----BEGIN").count() == 1;
    if !one_certificate {
        return Err(refused("not one PEM certificate".into()));
    }
    let failed = |what: &Path, e: std::io::Error| ErrorReply {
        code: codes::FILE_IO.into(),
        message: format!("{}: {e}", what.display()),
    };
    fs::create_dir_all(&paths.dir).map_err(|e| failed(&paths.dir, e))?;
    // The image's own CAs, kept aside the first time: a later CA (a woken VM's runner makes a
    // new one) replaces the earlier instead of joining it.
    let image_cas = paths.image_cas();
    if !image_cas.exists() {
        let own = match &paths.system_bundle {
            Some(system) if system.exists() => fs::read(system).map_err(|e| failed(system, e))?,
            _ => Vec::new(),
        };
        write(&image_cas, &own).map_err(|e| failed(&image_cas, e))?;
    }
    let mut bundle = fs::read(&image_cas).map_err(|e| failed(&image_cas, e))?;
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(pem.as_bytes());
    write(&paths.ca(), pem.as_bytes()).map_err(|e| failed(&paths.ca(), e))?;
    write(&paths.bundle(), &bundle).map_err(|e| failed(&paths.bundle(), e))?;
    if let Some(system) = paths.system_bundle.as_ref().filter(|s| s.exists()) {
        write(system, &bundle).map_err(|e| failed(system, e))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` (world-readable, as CA bundles are) through a temporary file
/// renamed into place.
fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("mvm-tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temporary, path)
}

/// The variables that point TLS stacks at the bundle: OpenSSL (and Python's `ssl`), curl,
/// Python's `requests`, git; Node takes the CA alone, in addition to its own.
pub fn environment(paths: &TrustPaths) -> Vec<(&'static str, String)> {
    let bundle = paths.bundle().display().to_string();
    vec![
        ("SSL_CERT_FILE", bundle.clone()),
        ("CURL_CA_BUNDLE", bundle.clone()),
        ("REQUESTS_CA_BUNDLE", bundle.clone()),
        ("GIT_SSL_CAINFO", bundle),
        ("NODE_EXTRA_CA_CERTS", paths.ca().display().to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_ca_joins_the_system_bundle_and_stands_alone() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("ca-certificates.crt");
        fs::write(
            &system,
            "-----BEGIN CERTIFICATE-----\nSYSTEM\n-----END CERTIFICATE-----",
        )
        .unwrap();
        let paths = TrustPaths {
            dir: dir.path().join("mvm"),
            system_bundle: Some(system.clone()),
        };
        trust(PEM, &paths).unwrap();
        let bundle = fs::read_to_string(paths.bundle()).unwrap();
        assert!(
            bundle.contains("SYSTEM") && bundle.ends_with(PEM),
            "{bundle}"
        );
        assert_eq!(fs::read_to_string(&system).unwrap(), bundle);
        assert_eq!(fs::read_to_string(paths.ca()).unwrap(), PEM);
        let env = environment(&paths);
        assert!(env
            .iter()
            .any(|(n, v)| *n == "SSL_CERT_FILE" && *v == paths.bundle().display().to_string()));

        // A woken VM's new CA takes the place of the old one.
        let next = PEM.replace("MIIB", "MIIC");
        trust(&next, &paths).unwrap();
        let bundle = fs::read_to_string(&system).unwrap();
        assert!(
            bundle.contains("SYSTEM") && bundle.ends_with(&next),
            "{bundle}"
        );
        assert!(!bundle.contains("MIIB"), "{bundle}");
    }

    #[test]
    fn anything_but_one_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TrustPaths {
            dir: dir.path().join("mvm"),
            system_bundle: None,
        };
        for bad in [
            "",
            "hello",
            &format!("{PEM}{PEM}"),
            "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----",
        ] {
            assert_eq!(
                trust(bad, &paths).unwrap_err().code,
                codes::BAD_REQUEST,
                "{bad}"
            );
        }
        assert!(!paths.ca().exists());
    }
}
