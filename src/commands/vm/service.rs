//! A named VM's services: waiting until they are healthy (`mvm up`, `mvm wait --healthy`),
//! what `mvm ls` shows of them, and their logs (`mvm logs --service`).

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_ir::terminal::{printable, Newlines};
use mvm_ir::ErrorClass;
pub use mvm_protocol::service::ServicesReport;
use mvm_protocol::service::{Health, ServiceInfo, ServiceState};
use mvm_protocol::{ExitStatus, Request, Response};
use mvm_runner::client::{AgentClient, OutputSink};

use super::{agent_error, connect};
use crate::commands::{coded_io, coded_with};

/// Without a health check, how long every service must have run to be taken as started: one
/// that fails at once is seen failing, not ready.
pub const STEADY: Duration = Duration::from_secs(2);
/// Without a health check, how often a waiter looks again.
const STEADY_LOOK: Duration = Duration::from_millis(250);
/// Beyond the wait asked of the agent, how long an answer may take.
const ANSWER_GRACE: Duration = Duration::from_secs(30);
/// The longest one wait asked of the agent: a client sees the VM go away within it.
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// The VM's services as its agent reports them now.
pub fn report(
    client: &mut AgentClient,
    wait: Option<(u64, Duration)>,
) -> anyhow::Result<ServicesReport> {
    let (changed_since, timeout) = match wait {
        Some((generation, timeout)) => (Some(generation), timeout),
        None => (None, Duration::ZERO),
    };
    let request = Request::Services {
        changed_since,
        timeout_ms: timeout.as_millis() as u64,
    };
    match client
        .call(&request, timeout + ANSWER_GRACE, None)
        .map_err(agent_error)?
    {
        Response::Services(report) => Ok(report),
        other => Err(coded_io("RUN025", format!("unexpected answer {other:?}"))),
    }
}

/// One word for `mvm ls`: the probe's verdict, or without a probe whether every service runs
/// (`running`), one is starting again (`restarting`) or one has ended (`stopped`, `failed`).
pub fn health_word(report: &ServicesReport) -> &'static str {
    if let Some(health) = &report.health {
        return health.status.name();
    }
    let worst = report
        .services
        .iter()
        .map(|s| s.state)
        .max_by_key(|state| match state {
            ServiceState::Running => 0,
            ServiceState::Stopped => 1,
            ServiceState::Restarting => 2,
            ServiceState::Failed => 3,
        });
    match worst {
        Some(ServiceState::Failed) => "failed",
        Some(ServiceState::Restarting) => "restarting",
        Some(ServiceState::Stopped) => "stopped",
        _ => "running",
    }
}

/// Where a VM's services stand for someone waiting for them to be ready.
pub enum Readiness {
    /// Every service runs and, where the app has a probe, it passed.
    Ready,
    /// Not yet.
    Pending,
    /// Never, unless someone acts: why.
    Failed(String),
}

/// Judges `report`: a service that failed (or stopped, which no probe can pass then) or an
/// unhealthy verdict fails; without a probe, every service running for [`STEADY`] is ready.
pub fn readiness(report: &ServicesReport) -> Readiness {
    let over = report.services.iter().find(|s| {
        s.state == ServiceState::Failed
            || (s.state == ServiceState::Stopped && report.health.is_some())
    });
    if let Some(service) = over {
        return Readiness::Failed(format!("service {} {}", service.name, ended(service)));
    }
    match &report.health {
        Some(health) => match health.status {
            Health::Healthy => Readiness::Ready,
            Health::Starting => Readiness::Pending,
            Health::Unhealthy => Readiness::Failed(format!(
                "unhealthy: {} probes in a row failed; the last said: {}",
                health.failures,
                printable(health.last_output.trim(), Newlines::Keep)
            )),
        },
        None if report.services.iter().all(|s| {
            s.state == ServiceState::Running
                && s.running_ms.unwrap_or_default() >= STEADY.as_millis() as u64
        }) =>
        {
            Readiness::Ready
        }
        None if report
            .services
            .iter()
            .all(|s| s.state == ServiceState::Stopped) =>
        {
            Readiness::Failed("every service has ended".into())
        }
        None => Readiness::Pending,
    }
}

/// How a service that is over ended, in words.
fn ended(service: &ServiceInfo) -> String {
    let how = match service.last_exit {
        Some(ExitStatus::Exited { code }) => format!("exited with {code}"),
        Some(ExitStatus::Signaled { signal }) => format!("was killed by signal {signal}"),
        Some(ExitStatus::TimedOut) => "timed out".into(),
        None => "did not start".into(),
    };
    let error = service
        .error
        .as_deref()
        .map(|e| format!(" ({})", printable(e, Newlines::Escape)))
        .unwrap_or_default();
    match service.state {
        ServiceState::Failed => format!(
            "{how}{error} and is not started again ({} restarts)",
            service.restarts
        ),
        _ => format!("{how}{error} and its policy does not start it again"),
    }
}

/// Waits up to `timeout` until the services of VM `name` are ready: the last report when they
/// are, RUN065 when they cannot be or the time ran out.
pub fn await_ready(name: &str, timeout: Duration) -> anyhow::Result<ServicesReport> {
    let mut client = connect(name, Arc::default())?;
    let deadline = Instant::now() + timeout;
    let mut seen = report(&mut client, None)?;
    loop {
        if seen.services.is_empty() {
            return Ok(seen);
        }
        let why = match readiness(&seen) {
            Readiness::Ready => return Ok(seen),
            Readiness::Failed(why) => why,
            Readiness::Pending => {
                let left = deadline.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    // Without a probe, time itself can make them ready.
                    let step = match seen.health {
                        Some(_) => LONGEST_WAIT,
                        None => STEADY_LOOK,
                    };
                    let wait = left.min(step);
                    seen = report(&mut client, Some((seen.generation, wait)))?;
                    continue;
                }
                let status = seen.health.as_ref().map_or("starting", |h| h.status.name());
                format!(
                    "still {status} after {}",
                    humantime::format_duration(timeout)
                )
            }
        };
        return Err(not_ready(name, &why));
    }
}

/// RUN065: the services of `name` are not ready.
fn not_ready(name: &str, why: &str) -> anyhow::Error {
    coded_with(
        "RUN065",
        ErrorClass::Integrity,
        format!(
            "{name} is not ready: {why}. It runs on: see `mvm logs {name} --service SERVICE`, \
             end it with `mvm rm --force {name}`"
        ),
    )
}

/// Prints the log of service `service` of VM `name`, its control characters made visible;
/// with `follow`, what it writes next too, until it stops for good or the VM ends.
pub fn logs(name: &str, service: &str, follow: bool) -> anyhow::Result<()> {
    let mut client = connect(name, Arc::default())?;
    let mut offset = 0;
    loop {
        let wait = if follow { LONGEST_WAIT } else { Duration::ZERO };
        let request = Request::ServiceLog {
            name: service.to_string(),
            offset,
            timeout_ms: wait.as_millis() as u64,
        };
        let mut shown = PrintableLog;
        let answer = match client.call(&request, wait + ANSWER_GRACE, Some(&mut shown)) {
            Ok(answer) => answer,
            // Following a VM that ended: its log ends with it.
            Err(_) if follow && !is_live(name) => return Ok(()),
            Err(e) => return Err(agent_error(e)),
        };
        let Response::ServiceLog(slice) = answer else {
            return Err(coded_io("RUN025", format!("unexpected answer {answer:?}")));
        };
        if slice.skipped > 0 {
            eprintln!(
                "mvm: {} bytes of {service}'s output before this are no longer kept",
                slice.skipped
            );
        }
        offset = slice.next_offset;
        if !follow || slice.ended {
            return Ok(());
        }
    }
}

fn is_live(name: &str) -> bool {
    super::named(name)
        .and_then(|vm| Ok(vm.state()?))
        .is_ok_and(|state| state.phase.is_live())
}

/// A service's output on this process's stdout, as a console is shown: the guest's to show,
/// never the terminal's to obey.
struct PrintableLog;

impl OutputSink for PrintableLog {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(printable(&String::from_utf8_lossy(bytes), Newlines::Keep).as_bytes())?;
        out.flush()
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stdout(bytes)
    }
}
