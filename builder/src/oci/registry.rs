//! Registries over the OCI distribution API, through the `oci-client` crate.
//!
//! HTTPS always, except plain HTTP for loopback registries (as Docker does) and for hosts the
//! user lists as insecure in `$MVM_HOME/config.toml`. Credentials are bearer tokens from
//! [`token_variable`], one variable per registry, so a token goes only to the registry it was
//! set for, whatever registry a reference (perhaps from someone else's declaration) names;
//! never from a docker config file. Tokens are never logged.

#[cfg(feature = "registry")]
mod client;

#[cfg(feature = "registry")]
pub use client::resolve_tag;
#[cfg(feature = "registry")]
pub(crate) use client::RegistrySource;

/// How registries are reached.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// `host[:port]` of registries that may be reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Show progress bars on pulls (when stderr is a terminal).
    pub progress: bool,
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("insecure_registries", &self.insecure_registries)
            .finish_non_exhaustive()
    }
}

/// The environment variable holding the bearer token for `registry`:
/// `MVM_OCI_BEARER_TOKEN_` + the `host[:port]` with letters uppercased, digits kept, and every
/// other byte written `_XX` in hex (`ghcr.io` → `MVM_OCI_BEARER_TOKEN_GHCR_2EIO`). The mapping is
/// one-to-one, so no two registries share a variable.
pub fn token_variable(registry: &str) -> String {
    let mut name = String::from("MVM_OCI_BEARER_TOKEN_");
    for b in registry.bytes() {
        if b.is_ascii_alphanumeric() {
            name.push(b.to_ascii_uppercase() as char);
        } else {
            name.push_str(&format!("_{b:02X}"));
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_variables_are_one_to_one() {
        assert_eq!(token_variable("ghcr.io"), "MVM_OCI_BEARER_TOKEN_GHCR_2EIO");
        assert_ne!(
            token_variable("registry.example.com"),
            token_variable("registry-example.com")
        );
        assert_ne!(token_variable("a.2d"), token_variable("a-"));
        assert_eq!(
            token_variable("127.0.0.1:5000"),
            "MVM_OCI_BEARER_TOKEN_127_2E0_2E0_2E1_3A5000"
        );
    }
}
