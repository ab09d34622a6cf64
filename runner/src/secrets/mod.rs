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

/// A secret a launch asks for beyond its plan's: `--secret NAME[:ENV]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The secret's name in the store.
    pub name: String,
    /// The variable it is given as (NAME upper-cased, `-` and `.` as `_`, when not named).
    pub env: String,
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
    /// The bound secrets, for the egress side.
    pub bound: Arc<Vec<BoundSecret>>,
    /// What output is scrubbed of.
    pub redactions: Arc<Redactions>,
}

impl LaunchSecrets {
    /// Whether the launch has any secret.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
    }
}

/// Resolves the plan's secrets and `extra` from `home`'s store.
pub fn resolve(
    home: &MvmHome,
    plan: &LaunchPlan,
    extra: &[SecretRef],
) -> Result<LaunchSecrets, AdmissionError> {
    let mut wanted: Vec<(String, String, bool)> = plan
        .policy
        .secrets
        .iter()
        .map(|s| (s.env.clone(), s.name.clone(), s.optional))
        .collect();
    wanted.extend(extra.iter().map(|s| (s.env.clone(), s.name.clone(), false)));
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
    for (env, name, optional) in wanted {
        let Some(resolved) = values.get(&name).and_then(Option::as_ref) else {
            if optional {
                continue;
            }
            return Err(refuse(
                codes::RUN030,
                format!("the secret {name:?} (for {env}) is not in this host's store: `mvm secret put {name}`"),
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
            let text = std::str::from_utf8(&resolved.value)
                .ok()
                .filter(|t| !t.contains('\0'))
                .ok_or_else(|| {
                    refuse(
                        codes::RUN061,
                        format!("the secret {name:?} is not text without NUL: it cannot be a variable's value"),
                    )
                })?;
            secrets.env.insert(env, text.to_string());
        } else {
            // A secret asked for under two variables has one placeholder.
            if let Some(known) = bound.iter().find(|b| b.name == name) {
                secrets.env.insert(env, known.placeholder.clone());
                continue;
            }
            let random =
                mvm_ir::plan::fresh_nonce().map_err(|e| refuse(codes::RUN030, e.to_string()))?;
            let placeholder = format!("{PLACEHOLDER_PREFIX}{random}");
            secrets.env.insert(env, placeholder.clone());
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
