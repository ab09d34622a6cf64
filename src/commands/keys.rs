//! `mvm keys …`: the host's signing keys and the keys it trusts.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::keys::DEFAULT_KEY;
use serde_json::json;

use super::Host;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an ed25519 signing key (stored mode 0600, never printed) and trust it here.
    Generate {
        /// The key's name.
        #[arg(long, default_value = DEFAULT_KEY)]
        name: String,
    },
    /// List this host's keys and the public keys it trusts.
    List,
    /// Print a key's public half as SubjectPublicKeyInfo PEM (what openssl and cosign read).
    Export {
        /// The key's name.
        name: String,
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Trust signatures by the ed25519 public key in a PEM file.
    Trust {
        /// SubjectPublicKeyInfo PEM file.
        pubkey: PathBuf,
    },
    /// Stop trusting a key id (the private key, if this host has it, is kept).
    Untrust {
        /// The key id (hex sha256 of the raw public key).
        keyid: String,
    },
}

pub fn run(cmd: KeysCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    match cmd {
        KeysCommand::Generate { name } => {
            let info = host.keys.generate(&name)?;
            host.audit("key.generate", json!({"name": name, "keyid": info.keyid}))?;
            out.result(json!(info), || {
                format!("generated key {name}: {}", info.keyid)
            });
        }
        KeysCommand::List => {
            let keys = host.keys.list()?;
            out.result(json!({ "keys": keys }), || {
                let mut text = format!("{:<20} {:<64} {:<7} TRUSTED", "NAME", "KEYID", "PRIVATE");
                for key in &keys {
                    text.push_str(&format!(
                        "\n{:<20} {:<64} {:<7} {}",
                        key.name.as_deref().unwrap_or("-"),
                        key.keyid,
                        if key.private { "yes" } else { "no" },
                        if key.trusted { "yes" } else { "no" },
                    ));
                }
                text
            });
        }
        KeysCommand::Export { name, output } => {
            let pem = host.keys.export(&name)?;
            match output {
                Some(path) => {
                    atomic_write(&path, pem.as_bytes(), 0o644)?;
                    out.result(json!({"name": name, "path": path}), || {
                        format!("wrote {}", path.display())
                    });
                }
                None if out.is_json() => out.result(json!({"name": name, "pem": pem}), String::new),
                None => print!("{pem}"),
            }
        }
        KeysCommand::Trust { pubkey } => {
            let pem = read_capped(&pubkey, 16 * 1024, "public key")?;
            let info = host.keys.trust_pem(&pem, &pubkey)?;
            host.audit("key.trust", json!({"keyid": info.keyid}))?;
            out.result(json!(info), || format!("trusted {}", info.keyid));
        }
        KeysCommand::Untrust { keyid } => {
            host.keys.untrust(&keyid)?;
            host.audit("key.untrust", json!({"keyid": keyid}))?;
            out.result(json!({"keyid": keyid, "trusted": false}), || {
                format!("no longer trusted: {keyid}")
            });
        }
    }
    Ok(())
}
