//! A launch's egress: when its plan grants any, the relay that judges and carries the
//! connections the guest opens, the log that records them, and the proxy the agent is asked to
//! serve. A plan that grants none gets nothing: every open is refused (RUN052) and the guest
//! has no proxy to ask.

use std::path::PathBuf;
use std::sync::Arc;

use mvm_ir::audit::HostAudit;
use mvm_ir::plan::LaunchPlan;
use mvm_ir::workload::NetworkMode;
use mvm_ir::Coded;
use mvm_protocol::Request;

use super::{agent_done, LaunchError};
use crate::admission::AdmissionError;
use crate::client::AgentClient;
use crate::egress::config::EgressConfig;
use crate::egress::dial::PolicyDialer;
use crate::egress::judge::{EgressPolicy, SystemResolver};
use crate::egress::log::EgressLog;
use crate::egress::relay::{Relay, RelayLimits};
use crate::mux::OpenHandler;
use crate::secrets::tls::Terminator;
use crate::secrets::LaunchSecrets;

/// The egress of a launch whose plan grants some.
pub(super) struct Egress {
    /// What the agent mux hands each connection to.
    pub handler: OpenHandler,
    /// The record of every decision.
    pub log: Arc<EgressLog>,
    /// The per-VM CA's certificate, for the guest to trust, when the launch has bound secrets.
    pub trusted_ca: Option<String>,
}

/// The egress of `plan`, narrowed by the launch's `--deny-host`s, under the operator's
/// `[egress]` configuration; `None` when the plan grants none. A bad configuration (RUN054) or
/// a grant the runner cannot judge (RUN055) refuses the launch.
pub(super) fn egress_for(
    launch: &super::Launch,
    plan: &LaunchPlan,
    audit: &Arc<HostAudit>,
    vm: &str,
    counts_file: Option<PathBuf>,
    secrets: &LaunchSecrets,
) -> Result<Option<Egress>, LaunchError> {
    if plan.policy.network != NetworkMode::Allowlist || plan.policy.egress.is_empty() {
        return Ok(None);
    }
    let refused = |e: &dyn Coded, reason: String| {
        LaunchError::Refused(AdmissionError::NotRunnable {
            code: e.code().to_string(),
            reason,
        })
    };
    let config = EgressConfig::load(&launch.home).map_err(|e| refused(&e, e.to_string()))?;
    let trust = config.tls_trust.clone();
    let limits = RelayLimits {
        max_connections: config.max_connections as usize,
        idle_timeout: config.idle_timeout,
    };
    let policy = EgressPolicy::new(&plan.policy.egress, config)
        .map_err(|e| refused(&e, e.to_string()))?
        .narrowed(launch.deny.clone());
    let log = EgressLog::new(Arc::clone(audit), vm, launch.net_log, counts_file);
    let dialer = PolicyDialer::new(policy, SystemResolver);
    let bound = Arc::clone(&secrets.bound);
    let tls = Terminator::new(&bound, &trust)
        .map_err(|reason| LaunchError::Host {
            what: "the bound secrets' TLS".into(),
            source: std::io::Error::other(reason),
        })?
        .map(Arc::new);
    let trusted_ca = tls.as_ref().map(|t| t.ca_pem().to_string());
    let relay = Relay::with_secrets(Box::new(dialer), limits, log.recorder(), bound, tls);
    Ok(Some(Egress {
        handler: relay.handler(),
        log,
        trusted_ca,
    }))
}

/// Asks the agent to serve its proxy — the commands it starts from now on reach it through
/// their environment — and to trust the per-VM CA of the bound secrets' hosts, when there is
/// one. An agent that cannot fails the launch.
pub(super) fn serve_proxy(client: &mut AgentClient, egress: &Egress) -> Result<(), LaunchError> {
    if let Some(pem) = &egress.trusted_ca {
        agent_done(
            client,
            &Request::TrustCa { pem: pem.clone() },
            "trust the VM's CA",
        )?;
    }
    agent_done(client, &Request::ServeProxy, "serve the egress proxy")
}
