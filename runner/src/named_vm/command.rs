//! A command run to its end in a named VM, with its signed receipt when asked: what `mvm
//! exec` and the local API's commands both do.

use std::io::Read;
use std::time::Duration;

use mvm_ir::keys::KeyStore;
use mvm_ir::plan::Timestamp;
use mvm_ir::receipt::{EgressCounts, Receipt};
use mvm_protocol::ExecRequest;

use super::{NamedVm, NamedVmError};
use crate::client::{AgentClient, Executed, OutputSink};
use crate::egress::log::{read_counts, COUNTS_FILE};
use crate::launch::command_result;

/// Beyond a command's own timeout, how long to wait for its answer.
const ANSWER_GRACE: Duration = Duration::from_secs(30);

/// A command that ran to its end.
#[derive(Debug)]
pub struct Ran {
    /// The agent's answer and the output's digests.
    pub executed: Executed,
    /// The signed receipt (a DSSE envelope), when one was asked for.
    pub receipt: Option<Vec<u8>>,
}

impl NamedVm {
    /// Runs `request` to its end over `client` (connected with [`NamedVm::connect`]),
    /// feeding it `input` and passing its output to `sink`; with `receipt`, issues a signed
    /// receipt for it on the host's receipt chain (kept in `$MVM_HOME/receipts`). The
    /// receipt counts what the VM's egress moved while the command ran (egress is counted
    /// VM-wide).
    pub fn run(
        &self,
        client: &mut AgentClient,
        request: ExecRequest,
        input: Option<Box<dyn Read + Send>>,
        sink: &mut dyn OutputSink,
        receipt: bool,
    ) -> Result<Ran, NamedVmError> {
        let vm = self.state()?;
        let started_at = Timestamp::now();
        let egress_before = self.egress_counts().unwrap_or_default();
        let argv_sha256 =
            mvm_ir::digest::sha256_prefixed(&serde_json::to_vec(&request.argv).unwrap_or_default());
        let answer_within = Duration::from_millis(request.timeout_ms) + ANSWER_GRACE;
        let executed = client.exec_with_input(request, input, answer_within, sink)?;
        if !receipt {
            return Ok(Ran {
                executed,
                receipt: None,
            });
        }
        let egress_after = self.egress_counts().unwrap_or_default();
        let receipt = Receipt {
            schema_version: mvm_ir::receipt::SCHEMA_VERSION.into(),
            plan_digest: vm.plan_digest,
            vm: vm.vm,
            argv_sha256,
            started_at,
            ended_at: Timestamp::now(),
            result: command_result(executed.reply.status),
            stdout: executed.stdout.clone(),
            stderr: executed.stderr.clone(),
            egress: vec![],
            egress_counts: counted_since(egress_before, egress_after),
            previous: None,
        };
        let signed = KeyStore::new(self.home.clone())
            .host_signer()
            .and_then(|signer| {
                mvm_ir::receipt::issue(&self.home, receipt, &signer, |bytes| {
                    let dir = self.home.ensure("receipts")?;
                    let name = mvm_ir::digest::sha256_hex(bytes);
                    mvm_ir::fsutil::atomic_write(&dir.join(format!("{name}.json")), bytes, 0o644)
                })
            })
            .map_err(|e| NamedVmError::host("issuing the receipt")(e.to_string()))?;
        Ok(Ran {
            executed,
            receipt: Some(signed),
        })
    }

    /// The egress its runner has counted so far (none for a VM whose plan grants none).
    pub fn egress_counts(&self) -> Option<EgressCounts> {
        read_counts(&self.dir.join(COUNTS_FILE))
    }
}

/// What a VM's egress counters moved by between two readings.
fn counted_since(before: EgressCounts, after: EgressCounts) -> EgressCounts {
    EgressCounts {
        allowed: after.allowed.saturating_sub(before.allowed),
        denied: after.denied.saturating_sub(before.denied),
        bytes_sent: after.bytes_sent.saturating_sub(before.bytes_sent),
        bytes_received: after.bytes_received.saturating_sub(before.bytes_received),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_moved_never_go_below_zero() {
        let before = EgressCounts {
            allowed: 3,
            denied: 1,
            bytes_sent: 100,
            bytes_received: 50,
        };
        let after = EgressCounts {
            allowed: 5,
            denied: 1,
            bytes_sent: 90,
            bytes_received: 80,
        };
        let moved = counted_since(before, after);
        assert_eq!(
            (
                moved.allowed,
                moved.denied,
                moved.bytes_sent,
                moved.bytes_received
            ),
            (2, 0, 0, 30)
        );
    }
}
