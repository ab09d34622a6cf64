//! The plan's services, started in a named VM's guest before anyone is told it is ready.

use std::collections::BTreeMap;

use mvm_ir::plan::LaunchPlan;
use mvm_ir::workload::RestartPolicy;
use mvm_protocol::service::{HealthSpec, Probe, Restart, ServiceSpec, StartServices};
use mvm_protocol::ExecRequest;

use crate::control::plan_environment;

/// What to ask the agent for the plan's services and health check, or `None` when it has no
/// service. Each runs as the plan's commands do: the plan's environment under the launch's,
/// its working directory, the entrypoint's user.
pub fn start_request(
    plan: &LaunchPlan,
    launch_env: &BTreeMap<String, String>,
) -> Option<StartServices> {
    if plan.services.is_empty() {
        return None;
    }
    let exec = |argv: &[String], cwd: Option<&String>| ExecRequest {
        argv: argv.to_vec(),
        env: plan_environment(plan, launch_env),
        cwd: cwd.or(plan.entrypoint.cwd.as_ref()).cloned(),
        timeout_ms: 0,
        stdin: false,
        user: plan.entrypoint.user.clone(),
        tty: None,
    };
    let services = plan
        .services
        .iter()
        .map(|service| ServiceSpec {
            name: service.name.clone(),
            exec: exec(&service.command, service.cwd.as_ref()),
            restart: match service.restart {
                RestartPolicy::Never => Restart::Never,
                RestartPolicy::OnFailure => Restart::OnFailure,
                RestartPolicy::Always => Restart::Always,
            },
            max_restarts: service.max_restarts,
        })
        .collect();
    let health = plan.health_check.as_ref().and_then(|check| {
        let probe = match (&check.command, check.tcp_port, &check.http) {
            (Some(argv), _, _) => Probe::Command {
                exec: exec(argv, None),
            },
            (None, Some(port), _) => Probe::Tcp { port },
            (None, None, Some(http)) => Probe::Http {
                port: http.port,
                path: http.path.clone(),
            },
            // A plan without a probe was refused at admission.
            (None, None, None) => return None,
        };
        let ms = |seconds: u32| u64::from(seconds) * 1000;
        Some(HealthSpec {
            probe,
            interval_ms: ms(check.interval_s),
            timeout_ms: ms(check.timeout_s),
            retries: check.retries,
            start_period_ms: ms(check.start_period_s),
        })
    });
    Some(StartServices { services, health })
}
