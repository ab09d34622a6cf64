//! A launch's secrets, resolved on the host from the store ([`mvm_ir::secrets`]) as the plan is
//! admitted: the plan's `secret_ref`s and the launch's own `--secret NAME[:ENV]`.
//!
//! - A **bound** secret (one `mvm secret bind` tied to hosts) never enters the guest: its
//!   variable holds a placeholder, `MVM_SECRET_` and 32 random hex digits drawn for this
//!   launch, and the egress side ([`egress`]) puts the value into requests to the bound hosts.
//! - An **unbound** secret's value is the variable's, where the plan's profile grants
//!   `unbound_secrets` (RUN061 otherwise).
//!
//! Either way every value (and its encodings) is scrubbed from the commands' output before it
//! is shown, kept or written ([`redact`]). A required secret the store does not hold fails the
//! launch (RUN030), an optional one leaves its variable unset. Values are held in memory that is
//! wiped when dropped, and never written: not to the VM's directory, the audit log, a receipt
//! or an error message.

pub mod egress;
pub mod redact;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;

use mvm_ir::home::MvmHome;
use mvm_ir::plan::LaunchPlan;
use mvm_ir::secrets::{Binding, SecretStore};
use mvm_ir::Coded;
use zeroize::Zeroizing;

use crate::admission::AdmissionError;
use crate::codes;
use redact::Redactions;

/// What a placeholder begins with.
pub const PLACEHOLDER_PREFIX: &str = "MVM_SECRET_";

/// Whether `text` is a placeholder: the prefix and 32 lowercase hex digits.
fn is_placeholder(text: &str) -> bool {
    text.strip_prefix(PLACEHOLDER_PREFIX).is_some_and(|random| {
        random.len() == 32
            && random
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The NAME of `--secret-file NAME`: a name of the store.
pub fn parse_file_secret(name: &str) -> Result<String, String> {
    match mvm_ir::validate::is_identifier(name) {
        true => Ok(name.to_string()),
        false => Err(format!("{name:?} is not a secret name")),
    }
}

/// A secret a launch asks for beyond its plan's: `--secret NAME[:ENV]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The secret's name in the store.
    pub name: String,
    /// The variable it is given as (NAME upper-cased, `-` and `.` as `_`, when not named).
    pub env: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.env)
    }
}

impl SecretRef {
    /// Parses `NAME[:ENV]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, env) = match text.split_once(':') {
            Some((name, env)) => (name, env.to_string()),
            None => (text, text.to_ascii_uppercase().replace(['-', '.'], "_")),
        };
        if !mvm_ir::validate::is_identifier(name) {
            return Err(format!("{name:?} is not a secret name"));
        }
        if !mvm_ir::validate::is_env_name(&env) || mvm_ir::env::is_denied(&env) {
            return Err(format!(
                "{env:?} is not a variable a secret may be given as"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            env,
        })
    }
}

/// A secret whose value only the host's egress side holds.
pub struct BoundSecret {
    /// Its name.
    pub name: String,
    /// What the guest holds instead of the value.
    pub placeholder: String,
    /// The value.
    pub value: Zeroizing<Vec<u8>>,
    /// Where it may go.
    pub bindings: Vec<Binding>,
}

impl std::fmt::Debug for BoundSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundSecret")
            .field("name", &self.name)
            .field("bindings", &self.bindings)
            .finish_non_exhaustive()
    }
}

/// A launch's secrets, resolved.
#[derive(Debug, Default)]
pub struct LaunchSecrets {
    /// Variables of every command: a placeholder or an unbound value.
    pub env: BTreeMap<String, String>,
    /// Files of the guest's `/run/secrets`, by secret name: a placeholder or an unbound value
    /// (`--secret-file`).
    pub files: BTreeMap<String, Zeroizing<Vec<u8>>>,
    /// The bound secrets, for the egress side.
    pub bound: Arc<Vec<BoundSecret>>,
    /// What output is scrubbed of.
    pub redactions: Arc<Redactions>,
}

impl LaunchSecrets {
    /// Whether the launch has any secret.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.files.is_empty()
    }
}

/// Where a resolved secret goes in the guest.
enum Given {
    /// The variable of this name.
    Env(String),
    /// The file `/run/secrets/NAME`.
    File,
}

impl std::fmt::Display for Given {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Given::Env(name) => f.write_str(name),
            Given::File => f.write_str("its file"),
        }
    }
}

/// What a launch asks for beyond its plan's secrets.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// `--secret NAME[:ENV]`.
    pub env: &'a [SecretRef],
    /// `--secret-file NAME`.
    pub files: &'a [String],
    /// Placeholders a bound secret keeps, by name (a woken VM's: its processes hold them).
    pub placeholders: &'a BTreeMap<String, String>,
}

/// Resolves the plan's secrets and the launch's `extra` from `home`'s store.
pub fn resolve(
    home: &MvmHome,
    plan: &LaunchPlan,
    extra: &Wanted<'_>,
) -> Result<LaunchSecrets, AdmissionError> {
    let mut wanted: Vec<(Given, String, bool)> = plan
        .policy
        .secrets
        .iter()
        .map(|s| (Given::Env(s.env.clone()), s.name.clone(), s.optional))
        .collect();
    wanted.extend(
        extra
            .env
            .iter()
            .map(|s| (Given::Env(s.env.clone()), s.name.clone(), false)),
    );
    wanted.extend(
        extra
            .files
            .iter()
            .map(|name| (Given::File, name.clone(), false)),
    );
    if wanted.is_empty() {
        return Ok(LaunchSecrets::default());
    }
    let refuse = |code: &str, reason: String| AdmissionError::NotRunnable {
        code: code.into(),
        reason,
    };
    let store = SecretStore::open(home).map_err(|e| refuse(codes::RUN030, e.to_string()))?;
    let names: Vec<&str> = wanted.iter().map(|(_, name, _)| name.as_str()).collect();
    let values = store.resolve(&names).map_err(|e| {
        refuse(
            codes::RUN030,
            format!("the secret store ({}): {e}", e.code()),
        )
    })?;
    let mut secrets = LaunchSecrets::default();
    let mut bound: Vec<BoundSecret> = Vec::new();
    let mut redactions = Redactions::default();
    for (given, name, optional) in wanted {
        let Some(resolved) = values.get(&name).and_then(Option::as_ref) else {
            if optional {
                continue;
            }
            return Err(refuse(
                codes::RUN030,
                format!("the secret {name:?} (for {given}) is not in this host's store: `mvm secret put {name}`"),
            ));
        };
        redactions.add(&name, &resolved.value);
        if resolved.bindings.is_empty() {
            if !plan.policy.grants.unbound_secrets {
                return Err(refuse(
                    codes::RUN061,
                    format!(
                        "the secret {name:?} is bound to no host, and the plan's {} profile hands no secret's value to a command: bind it (`mvm secret bind {name} --host H`)",
                        plan.policy.profile
                    ),
                ));
            }
            let Given::Env(env) = given else {
                secrets.files.insert(name, resolved.value.clone());
                continue;
            };
            let text = std::str::from_utf8(&resolved.value)
                .ok()
                .filter(|t| !t.contains('\0'))
                .ok_or_else(|| {
                    refuse(
                        codes::RUN061,
                        format!("the secret {name:?} is not text without NUL: it cannot be a variable's value (give it as a file: --secret-file)"),
                    )
                })?;
            secrets.env.insert(env, text.to_string());
        } else {
            // A secret asked for twice has one placeholder.
            if let Some(known) = bound.iter().find(|b| b.name == name) {
                give(&mut secrets, given, name, &known.placeholder);
                continue;
            }
            let placeholder = match extra.placeholders.get(&name) {
                Some(kept) if is_placeholder(kept) => kept.clone(),
                _ => {
                    let random = mvm_ir::plan::fresh_nonce()
                        .map_err(|e| refuse(codes::RUN030, e.to_string()))?;
                    format!("{PLACEHOLDER_PREFIX}{random}")
                }
            };
            give(&mut secrets, given, name.clone(), &placeholder);
            bound.push(BoundSecret {
                name,
                placeholder,
                value: resolved.value.clone(),
                bindings: resolved.bindings.clone(),
            });
        }
    }
    secrets.bound = Arc::new(bound);
    secrets.redactions = Arc::new(redactions);
    Ok(secrets)
}

/// Gives the guest a bound secret's placeholder where it asked for the secret.
fn give(secrets: &mut LaunchSecrets, given: Given, name: String, placeholder: &str) {
    match given {
        Given::Env(env) => {
            secrets.env.insert(env, placeholder.to_string());
        }
        Given::File => {
            secrets
                .files
                .insert(name, Zeroizing::new(placeholder.as_bytes().to_vec()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_ir::secrets::Binding;

    fn plan() -> LaunchPlan {
        let mut json: serde_json::Value =
            serde_json::from_str(include_str!("../../../examples/plan/plan.json")).unwrap();
        json["nonce"] = "00".repeat(16).into();
        json["single_use"] = false.into();
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_woken_launch_keeps_its_placeholders_and_draws_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let home = MvmHome::at(dir.path());
        let store = SecretStore::open(&home).unwrap();
        // The example plan names `api-key` itself.
        for name in ["api-key", "api-token", "other-token"] {
            store.put(name, b"value-of-a-token").unwrap();
            store
                .bind(name, Binding::parse("api.example.com", None).unwrap())
                .unwrap();
        }
        let wanted = [
            SecretRef::parse("api-token").unwrap(),
            SecretRef::parse("other-token").unwrap(),
        ];
        let files = ["api-token".to_string()];
        let none = BTreeMap::new();
        let extra = |placeholders| Wanted {
            env: &wanted,
            files: &files,
            placeholders,
        };
        let first = resolve(&home, &plan(), &extra(&none)).unwrap();
        let drawn = &first.env["API_TOKEN"];
        assert!(is_placeholder(drawn), "{drawn}");
        assert_ne!(first.env["API_TOKEN"], first.env["OTHER_TOKEN"]);
        // A secret asked for as a variable and as a file has one placeholder in both.
        assert_eq!(first.files["api-token"].as_slice(), drawn.as_bytes());

        // A kept placeholder is given again; a malformed one is not trusted, a fresh one drawn.
        let kept = BTreeMap::from([
            ("api-token".to_string(), drawn.clone()),
            ("other-token".to_string(), "MVM_SECRET_not-hex".to_string()),
        ]);
        let woken = resolve(&home, &plan(), &extra(&kept)).unwrap();
        assert_eq!(&woken.env["API_TOKEN"], drawn);
        assert!(is_placeholder(&woken.env["OTHER_TOKEN"]));
        assert_ne!(woken.env["OTHER_TOKEN"], "MVM_SECRET_not-hex");
        assert!(woken
            .bound
            .iter()
            .any(|b| b.name == "api-token" && b.placeholder == *drawn));
    }
}
