//! Services: long-running commands the agent supervises — restarted by their policy, their
//! output kept in a bounded log — and the probe that says whether the app is healthy.

use serde::{Deserialize, Serialize};

use crate::message::{ExecRequest, ExitStatus};

/// Bytes of a service's output (stdout and stderr as they came) the agent keeps; the oldest
/// go first.
pub const SERVICE_LOG_BYTES: usize = 256 * 1024;
/// The most services one [`StartServices`] names.
pub const MAX_SERVICES: usize = 16;
/// The most bytes a probe's output kept for [`HealthInfo::last_output`].
pub const PROBE_OUTPUT_BYTES: usize = 4096;

/// What the runner asks the agent to start, once, before the VM is said to be ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartServices {
    /// The services, started in this order.
    pub services: Vec<ServiceSpec>,
    /// The app's readiness probe, run from when the services start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Its name: 1–32 of `a-z 0-9 _ -`.
    pub name: String,
    /// What it runs (its `timeout_ms` is not used: a service runs until it ends or the VM
    /// does; `stdin` and `tty` are refused).
    pub exec: ExecRequest,
    /// When it is started again after it ended.
    pub restart: Restart,
    /// How many times it is started again at most.
    pub max_restarts: u32,
}

/// When a service that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Never.
    Never,
    /// When it exited with a status other than 0 or was killed by a signal.
    OnFailure,
    /// Whatever its status.
    Always,
}

/// How the app's readiness is probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// What one probe does.
    pub probe: Probe,
    /// Between two probes once the app was healthy or the start period is over (while it
    /// starts, probes run every second).
    pub interval_ms: u64,
    /// How long one probe may take; longer is a failure.
    pub timeout_ms: u64,
    /// Consecutive failures that make a healthy app (or one past its start period)
    /// unhealthy.
    pub retries: u32,
    /// From the start, failures do not count for this long.
    pub start_period_ms: u64,
}

/// One probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// A command; exit 0 is healthy.
    Command {
        /// What runs (as a spawned command: no input, no terminal).
        exec: ExecRequest,
    },
    /// A TCP connection to `127.0.0.1:port` in the guest; accepted is healthy.
    Tcp {
        /// The port, 1–65535.
        port: u16,
    },
    /// An HTTP/1.1 `GET path` to `127.0.0.1:port` in the guest; a 2xx or 3xx status is
    /// healthy.
    Http {
        /// The port, 1–65535.
        port: u16,
        /// The request target: `/` and printable ASCII without spaces, at most 1024 bytes.
        path: String,
    },
}

impl Probe {
    /// Why the probe cannot be run, if it cannot.
    pub fn problem(&self) -> Option<String> {
        match self {
            Probe::Command { exec } => exec.problem(),
            Probe::Tcp { port: 0 } | Probe::Http { port: 0, .. } => Some("port 0".into()),
            Probe::Http { path, .. } if !is_http_path(path) => Some(format!(
                "{path:?} is not an HTTP path: `/` and printable ASCII without spaces"
            )),
            _ => None,
        }
    }
}

/// Whether `path` may be an HTTP probe's request target.
pub fn is_http_path(path: &str) -> bool {
    path.starts_with('/') && path.len() <= 1024 && path.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `name` may name a service: 1–32 of `a-z 0-9 _ -`.
pub fn is_service_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// Where a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Its process runs.
    Running,
    /// It ended and is started again after a back-off.
    Restarting,
    /// It ended and is not started again: its policy says so, or it could not be started.
    Stopped,
    /// It ended after its last allowed restart.
    Failed,
}

/// A service as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInfo {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub state: ServiceState,
    /// Its process id while it runs (also its process group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its handle for `kill` and `ps` while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    /// Milliseconds its process has run, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_ms: Option<u64>,
    /// Times it was started again.
    pub restarts: u32,
    /// How its last process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitStatus>,
    /// Why it could not be started, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether the app is healthy, by its probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// No probe has passed yet, and the failures so far do not make it unhealthy.
    Starting,
    /// The last probe passed.
    Healthy,
    /// `retries` probes in a row failed.
    Unhealthy,
}

impl Health {
    /// Its name, as `mvm ls` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthInfo {
    /// The verdict.
    pub status: Health,
    /// Failures in a row.
    pub failures: u32,
    /// Probes run.
    pub probes: u64,
    /// What the last probe said (a command's output, or why a connection failed), at most
    /// [`PROBE_OUTPUT_BYTES`].
    pub last_output: String,
}

/// The services and their health (the answer to `services`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesReport {
    /// Grows with every change of a service's state or of the health verdict.
    pub generation: u64,
    /// The services, in the order they were started.
    pub services: Vec<ServiceInfo>,
    /// The health, when the app has a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthInfo>,
}

/// How much of a service's log one answer carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSlice {
    /// Where to ask from next time.
    pub next_offset: u64,
    /// Bytes between the offset asked for and the first one sent that are no longer kept.
    pub skipped: u64,
    /// The service has stopped for good: no more will come.
    pub ended: bool,
}
