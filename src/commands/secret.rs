//! `mvm secret put | ls | rm | bind | unbind`: the host's encrypted secret store
//! ([`mvm_ir::secrets`]). Values come in on standard input, from a file or from a variable —
//! never as an argument, which every user of the host can read — and never go out: `ls` shows
//! names and bindings, the audit log names only.

use std::io::Read;
use std::path::PathBuf;

use clap::Subcommand;
use mvm_ir::secrets::{Binding, SecretStore, MAX_VALUE_BYTES};
use serde_json::json;
use zeroize::Zeroizing;

use super::{coded, coded_as, Host};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a secret's value (replacing one of that name; its bindings stay). The value comes
    /// from standard input unless a flag names a source; one trailing newline is dropped.
    Put {
        /// The secret's name, as plans and `--secret` name it.
        name: String,
        /// Read the value from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "from_env")]
        value_file: Option<PathBuf>,
        /// Take the value from this process's variable VAR.
        #[arg(long, value_name = "VAR")]
        from_env: Option<String>,
    },
    /// List the secrets: names, when each was put, the hosts each is bound to. Never values.
    Ls,
    /// Remove a secret.
    Rm {
        /// The secret's name.
        name: String,
    },
    /// Bind a secret to a host: its value then never enters a guest. The guest sees a
    /// placeholder, and the host puts the value into requests to HOST only — where the
    /// placeholder stands in a header, or as --inject says.
    Bind {
        /// The secret's name.
        name: String,
        /// An exact DNS name, with :PORT (443 when absent).
        #[arg(long, value_name = "HOST[:PORT]")]
        host: String,
        /// header:NAME (the value as that header), bearer (`Authorization: Bearer VALUE`) or
        /// basic (`Authorization: Basic …` of `user:password`); default: the placeholder's
        /// place.
        #[arg(long, value_name = "HOW")]
        inject: Option<String>,
    },
    /// Take a secret's binding to a host away.
    Unbind {
        /// The secret's name.
        name: String,
        /// The host and port it was bound to.
        #[arg(long, value_name = "HOST[:PORT]")]
        host: String,
    },
}

pub fn run(command: SecretCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let store = SecretStore::open(&host.home).map_err(coded)?;
    match command {
        SecretCommand::Put {
            name,
            value_file,
            from_env,
        } => {
            let value = value(value_file, from_env)?;
            store.put(&name, &value).map_err(coded)?;
            host.audit("secret.put", json!({"name": name}))?;
            out.result(json!({"name": name, "bytes": value.len()}), || {
                format!("{name}: {} bytes stored", value.len())
            });
        }
        SecretCommand::Ls => {
            let secrets = store.list().map_err(coded)?;
            out.result(json!({"secrets": secrets}), || {
                if secrets.is_empty() {
                    return "no secrets".into();
                }
                secrets
                    .iter()
                    .map(|s| {
                        let bound: Vec<String> = s
                            .bindings
                            .iter()
                            .map(|b| format!("{}:{}", b.host, b.port))
                            .collect();
                        let bound = match bound.is_empty() {
                            true => "unbound".to_string(),
                            false => format!("bound to {}", bound.join(", ")),
                        };
                        format!("{}  {}  {bound}", s.name, s.updated)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        SecretCommand::Rm { name } => {
            if !store.remove(&name).map_err(coded)? {
                return Err(coded(mvm_ir::secrets::SecretError::Unknown(name)));
            }
            host.audit("secret.removed", json!({"name": name}))?;
            out.result(json!({"removed": name}), || format!("{name} removed"));
        }
        SecretCommand::Bind {
            name,
            host: target,
            inject,
        } => {
            let binding = Binding::parse(&target, inject.as_deref()).map_err(coded)?;
            store.bind(&name, binding.clone()).map_err(coded)?;
            host.audit(
                "secret.bound",
                json!({"name": name, "host": binding.host, "port": binding.port}),
            )?;
            out.result(json!({"name": name, "binding": binding}), || {
                format!("{name} bound to {}:{}", binding.host, binding.port)
            });
        }
        SecretCommand::Unbind { name, host: target } => {
            let binding = Binding::parse(&target, None).map_err(coded)?;
            if !store
                .unbind(&name, &binding.host, binding.port)
                .map_err(coded)?
            {
                return Err(coded_as(
                    "SECRET001",
                    format!("{name} is not bound to {}:{}", binding.host, binding.port),
                ));
            }
            host.audit(
                "secret.unbound",
                json!({"name": name, "host": binding.host, "port": binding.port}),
            )?;
            out.result(json!({"name": name, "unbound": target}), || {
                format!("{name} unbound from {}:{}", binding.host, binding.port)
            });
        }
    }
    Ok(())
}

/// The value from the source the flags name, or standard input; one trailing newline dropped.
fn value(file: Option<PathBuf>, variable: Option<String>) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let limit = MAX_VALUE_BYTES as u64 + 2;
    let mut value = Zeroizing::new(Vec::new());
    match (file, variable) {
        (Some(path), _) => {
            let bytes = mvm_ir::fsutil::read_capped(&path, limit, "the secret's value file")?;
            value.extend_from_slice(&bytes);
        }
        (None, Some(name)) => {
            let text = std::env::var(&name).map_err(|_| {
                coded_as(
                    "SECRET002",
                    format!(
                        "--from-env {name}: this process has no such variable (or it is not UTF-8)"
                    ),
                )
            })?;
            value.extend_from_slice(text.as_bytes());
        }
        (None, None) => {
            std::io::stdin().take(limit).read_to_end(&mut value)?;
        }
    }
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    Ok(value)
}
