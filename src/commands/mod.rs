//! One module per command group. Each `run` returns `anyhow::Result<()>`; errors from the
//! crates keep their type inside the `anyhow::Error`, so [`crate::output::Output::error`] can
//! report their stable code and exit status.

pub mod audit;
pub mod ir;
pub mod keys;
pub mod plan;

use mvm_ir::audit::AuditLog;
use mvm_ir::home::MvmHome;
use mvm_ir::keys::KeyStore;
use serde_json::{Map, Value};

/// The host's state directory and what lives in it.
pub struct Host {
    pub home: MvmHome,
    pub keys: KeyStore,
}

impl Host {
    pub fn open() -> anyhow::Result<Self> {
        let home = MvmHome::from_env()?;
        Ok(Self {
            keys: KeyStore::new(home.clone()),
            home,
        })
    }

    /// Appends a signed entry to the audit chain. A failure to record is a failure of the
    /// command: mvm does not act without leaving evidence.
    pub fn audit(&self, event: &str, fields: Value) -> anyhow::Result<()> {
        let fields: Map<String, Value> = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let signer = self.keys.host_signer()?;
        AuditLog::in_home(&self.home)?.append(event, fields, &signer)?;
        Ok(())
    }
}
