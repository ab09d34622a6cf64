//! The evidence of a VM's egress: every decision an audit entry (`egress.allowed`,
//! `egress.denied`, and `egress.closed` with the bytes each way), counted for `mvm ls` and the
//! run's receipt, and — with `--net-log` — printed as it happens.
//!
//! An entry names the VM, the host as the guest asked for it, the port, the addresses, how the
//! guest asked and why a connection was refused: never a path, a header or a byte of a body,
//! which the relay never sees as such.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use mvm_ir::audit::HostAudit;
use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::receipt::{EgressCounts, EgressDecision, MAX_EGRESS_DECISIONS};
use mvm_protocol::OpenRequest;
use serde_json::{json, Value};

use super::judge::shown_host;
use super::relay::{EventRecorder, RelayEvent};

/// The counters' file in a named VM's directory, read by `mvm ls`.
pub const COUNTS_FILE: &str = "egress.json";

/// Where a VM's egress events go.
pub struct EgressLog {
    audit: Arc<HostAudit>,
    vm: String,
    /// Print each decision to standard error (`--net-log`).
    print: bool,
    /// Where the counters are kept on disk, for a named VM.
    counts_file: Option<PathBuf>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    counts: EgressCounts,
    decisions: Vec<EgressDecision>,
}

impl EgressLog {
    /// A log appending to `audit` for the VM `vm`; its counts go on from those in
    /// `counts_file` (a woken VM's).
    pub fn new(
        audit: Arc<HostAudit>,
        vm: &str,
        print: bool,
        counts_file: Option<PathBuf>,
    ) -> Arc<Self> {
        let counts = counts_file
            .as_deref()
            .and_then(read_counts)
            .unwrap_or_default();
        Arc::new(Self {
            audit,
            vm: vm.to_string(),
            print,
            counts_file,
            seen: Mutex::new(Seen {
                counts,
                decisions: Vec::new(),
            }),
        })
    }

    /// The relay's recorder: an event is recorded once its audit entry is written.
    pub fn recorder(self: &Arc<Self>) -> EventRecorder {
        let log = Arc::clone(self);
        Box::new(move |event| log.record(event))
    }

    /// The counts so far.
    pub fn counts(&self) -> EgressCounts {
        self.seen().counts
    }

    /// The decisions so far (the first [`MAX_EGRESS_DECISIONS`]).
    pub fn decisions(&self) -> Vec<EgressDecision> {
        self.seen().decisions.clone()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, event: RelayEvent) -> bool {
        let (name, fields, decision) = self.entry(&event);
        let recorded = self.audit.append(name, fields).is_ok();
        if self.print {
            eprintln!("mvm: {}", line(&event));
        }
        let mut seen = self.seen();
        match &event {
            RelayEvent::Allowed { .. } => seen.counts.allowed += 1,
            RelayEvent::Denied { .. } => seen.counts.denied += 1,
            RelayEvent::Closed { sent, received, .. } => {
                seen.counts.bytes_sent += sent;
                seen.counts.bytes_received += received;
            }
        }
        if let Some(decision) = decision {
            if seen.decisions.len() < MAX_EGRESS_DECISIONS {
                seen.decisions.push(decision);
            }
        }
        if let Some(file) = &self.counts_file {
            if let Ok(bytes) = serde_json::to_vec(&seen.counts) {
                // The counters are a convenience: the audit log is the evidence.
                let _ = atomic_write(file, &bytes, 0o600);
            }
        }
        recorded
    }

    /// The audit entry of `event`, and its decision for the receipt.
    fn entry(&self, event: &RelayEvent) -> (&'static str, Value, Option<EgressDecision>) {
        let request = match event {
            RelayEvent::Allowed { request, .. }
            | RelayEvent::Denied { request, .. }
            | RelayEvent::Closed { request, .. } => request,
        };
        let host = shown_host(&request.host);
        let mut fields = json!({
            "vm": self.vm, "host": host, "port": request.port, "via": request.via,
        });
        let decision = |allowed, address: Option<String>, reason: Option<&str>| EgressDecision {
            host: host.clone(),
            port: request.port,
            allowed,
            address,
            reason: reason.map(str::to_string),
        };
        match event {
            RelayEvent::Allowed { address, .. } => {
                fields["address"] = json!(address.to_string());
                let decision = decision(true, Some(address.to_string()), None);
                ("egress.allowed", fields, Some(decision))
            }
            RelayEvent::Denied { refusal, .. } => {
                let addresses: Vec<String> =
                    refusal.addresses.iter().map(ToString::to_string).collect();
                fields["addresses"] = json!(addresses);
                fields["reason"] = json!(refusal.reason);
                fields["code"] = json!(refusal.code);
                if let Some(malformed) = &request.malformed {
                    fields["request_code"] = json!(malformed);
                }
                let decision = decision(false, None, Some(refusal.reason));
                ("egress.denied", fields, Some(decision))
            }
            RelayEvent::Closed { sent, received, .. } => {
                fields["sent"] = json!(sent);
                fields["received"] = json!(received);
                ("egress.closed", fields, None)
            }
        }
    }
}

/// The counts a VM's directory holds, if it holds any that can be read.
pub fn read_counts(file: &Path) -> Option<EgressCounts> {
    let bytes = read_capped(file, 4096, "egress counts").ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// One line for `--net-log`.
fn line(event: &RelayEvent) -> String {
    let target = |request: &OpenRequest| format!("{}:{}", shown_host(&request.host), request.port);
    match event {
        RelayEvent::Allowed { request, address } => {
            format!("egress allowed {} -> {address}", target(request))
        }
        RelayEvent::Denied { request, refusal } => {
            format!("egress denied {}: {}", target(request), refusal.reason)
        }
        RelayEvent::Closed {
            request,
            sent,
            received,
        } => format!(
            "egress closed {}: {sent} bytes out, {received} in",
            target(request)
        ),
    }
}
