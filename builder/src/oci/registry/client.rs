//! The registry client (only with the `registry` feature, on by default: the fuzz targets,
//! which only parse, build without it and without its network stack).

use std::io::Write;
use std::net::IpAddr;

use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{token_variable, RegistryOptions};
use crate::oci::manifest::ACCEPTED_MANIFEST_TYPES;
use crate::oci::{BlobSource, OciError};

/// Whether `registry` (`host[:port]`) is on the loopback interface.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(host, _)| host)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The bearer token for `registry`, if any: its own variable's. (A generic
/// `MVM_OCI_BEARER_TOKEN` is not read: it would go to any registry a reference names.)
fn bearer_token(registry: &str) -> Option<String> {
    std::env::var(token_variable(registry))
        .ok()
        .filter(|t| !t.is_empty())
}

/// One repository of one registry.
pub(crate) struct RegistrySource {
    runtime: tokio::runtime::Runtime,
    client: Client,
    registry: String,
    repository: String,
    auth: RegistryAuth,
    progress: bool,
}

impl RegistrySource {
    pub(crate) fn connect(
        registry: &str,
        repository: &str,
        options: &RegistryOptions,
    ) -> Result<Self, OciError> {
        // rustls needs a process-wide crypto provider; installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let plain_http =
            is_loopback(registry) || options.insecure_registries.iter().any(|r| r == registry);
        let protocol = if plain_http {
            ClientProtocol::HttpsExcept(vec![registry.to_string()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..ClientConfig::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| OciError::io("tokio runtime", e))?;
        let auth = bearer_token(registry).map_or(RegistryAuth::Anonymous, RegistryAuth::Bearer);
        let client = runtime.block_on(async { Client::new(config) });
        Ok(Self {
            runtime,
            client,
            registry: registry.to_string(),
            repository: repository.to_string(),
            auth,
            progress: options.progress,
        })
    }

    /// The reference to this repository with `suffix` (`@sha256:…` or `:tag`).
    fn reference(&self, suffix: &str) -> Result<Reference, OciError> {
        let text = format!("{}/{}{suffix}", self.registry, self.repository);
        text.parse()
            .map_err(|e: oci_client::ParseError| OciError::BadReference {
                reference: text.clone(),
                reason: e.to_string(),
            })
    }

    /// The raw bytes of the manifest `reference` names (not parsed).
    fn manifest_bytes(&self, reference: &Reference) -> Result<Vec<u8>, OciError> {
        let (bytes, _) = self
            .runtime
            .block_on(
                self.client
                    .pull_manifest_raw(reference, &self.auth, ACCEPTED_MANIFEST_TYPES),
            )
            .map_err(|e| self.failed(e))?;
        Ok(bytes.to_vec())
    }

    fn failed(&self, err: impl std::fmt::Display) -> OciError {
        OciError::Registry {
            registry: self.registry.clone(),
            reason: err.to_string(),
        }
    }
}

impl BlobSource for RegistrySource {
    fn fetch_manifest(&mut self, digest: &str, out: &mut dyn Write) -> Result<(), OciError> {
        let bytes = self.manifest_bytes(&self.reference(&format!("@{digest}"))?)?;
        out.write_all(&bytes)
            .map_err(|e| OciError::io("blob cache", e))
    }

    fn fetch_blob(&mut self, digest: &str, size: u64, out: &mut dyn Write) -> Result<(), OciError> {
        let reference = self.reference(&format!("@{digest}"))?;
        // Authenticate (a manifest request does it) before streaming the blob.
        let client = &self.client;
        let auth = &self.auth;
        let bar = if self.progress {
            let bar = ProgressBar::new(size);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(digest[7..19].to_string());
            bar
        } else {
            ProgressBar::hidden()
        };
        let result = self.runtime.block_on(async {
            client
                .store_auth_if_needed(reference.resolve_registry(), auth)
                .await;
            let mut stream = client
                .pull_blob_stream(&reference, digest)
                .await
                .map_err(|e| e.to_string())?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                out.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
                bar.inc(chunk.len() as u64);
            }
            Ok::<(), String>(())
        });
        bar.finish_and_clear();
        result.map_err(|reason| {
            if reason.starts_with("write: ") && reason.contains("bytes expected") {
                OciError::io(
                    "blob cache",
                    std::io::Error::new(std::io::ErrorKind::FileTooLarge, reason),
                )
            } else {
                self.failed(reason)
            }
        })
    }
}

/// The digest a registry currently serves for `registry/repository:tag`: the sha256 of the
/// manifest bytes it returns (nothing is parsed). For `--allow-unpinned` development builds,
/// which record the digest they resolved.
pub fn resolve_tag(
    registry: &str,
    repository: &str,
    tag: &str,
    options: &RegistryOptions,
) -> Result<String, OciError> {
    let source = RegistrySource::connect(registry, repository, options)?;
    let bytes = source.manifest_bytes(&source.reference(&format!(":{tag}"))?)?;
    Ok(mvm_ir::digest::sha256_prefixed(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_only_to_the_registry_it_was_set_for() {
        std::env::set_var("MVM_OCI_BEARER_TOKEN", "generic");
        std::env::set_var(token_variable("registry.example.com"), "for-example");
        assert_eq!(
            bearer_token("registry.example.com").as_deref(),
            Some("for-example")
        );
        assert_eq!(bearer_token("api.example.com"), None);
        assert_eq!(bearer_token("127.0.0.1:5000"), None);
        std::env::remove_var("MVM_OCI_BEARER_TOKEN");
    }

    #[test]
    fn loopback_detection() {
        for yes in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "10.0.0.1:5000",
            "registry.example.com",
            "[2001:db8::1]:443",
            "127.0.0.1.nip.io:5000",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
