//! `mvm audit …`: verify and read the audit chain.

use clap::Subcommand;
use mvm_ir::audit::AuditLog;
use serde_json::json;

use super::Host;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify every entry's signature and the hash chain; report the first bad line and why.
    ///
    /// Finds edits, deletions, insertions, reordering, truncation, bad signatures and entries
    /// by untrusted keys. Exit 0 if intact, 1 if broken.
    Verify,
    /// Print the last entries.
    Tail {
        /// How many entries.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
    },
}

pub fn run(cmd: AuditCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let log = AuditLog::in_home(&host.home)?;
    match cmd {
        AuditCommand::Verify => {
            let trust = host.keys.trust_store()?;
            let summary = log.verify(&trust)?;
            out.result(
                json!({"ok": true, "entries": summary.entries, "head": summary.head, "path": log.path()}),
                || format!("intact: {} entries, head {}", summary.entries, summary.head),
            );
        }
        AuditCommand::Tail { lines } => {
            let entries = log.tail(lines)?;
            out.result(json!({ "entries": entries }), || {
                entries
                    .iter()
                    .map(|e| {
                        let fields = serde_json::to_string(&e.fields).unwrap_or_default();
                        format!("{:>6} {} {:<16} {fields}", e.seq, e.time, e.event)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}
