//! `mvm policy show | explain`: what a plan (or a profile) allows on this host, and the rule
//! that decides each request. The rules are the ones that enforce: the plan's signed grants
//! ([`mvm_ir::policy`]), the runner's grant matching ([`mvm_runner::egress::grant`]), the
//! environment denylist ([`mvm_ir::env`]) and this host's `[policy]` ceilings
//! ([`HostPolicy`]); this only asks them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use mvm_ir::admission::verify_signed_plan;
use mvm_ir::plan::{LaunchPlan, MAX_ENVELOPE_BYTES};
use mvm_ir::policy::{Grants, Profile};
use mvm_runner::admission::host_policy::HostPolicy;
use mvm_runner::egress::authority::Authority;
use mvm_runner::egress::grant::Grant;
use serde_json::{json, Value};

use super::build::parse_profile;
use super::{coded, coded_as, Host};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show what a signed plan is allowed (its profile's grants, its egress, ports,
    /// environment and secret names) and whether this host's `[policy]` lets it run; without
    /// a plan, every profile's grants and this host's ceilings.
    Show {
        /// A signed plan (`plan.dsse.json`) or the bundle directory holding one.
        plan: Option<PathBuf>,
    },
    /// Say whether one request is allowed under a plan (or a profile, default standard) on
    /// this host, and the rule that decided. Exit 0 allowed, 1 denied.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A signed plan (`plan.dsse.json`) or the bundle directory holding one.
    plan: Option<PathBuf>,
    /// Without a plan: the profile to ask about (a plan with no grants of its own).
    #[arg(long, conflicts_with = "plan", value_name = "PROFILE", value_parser = parse_profile)]
    profile: Option<Profile>,
    /// An outbound connection to HOST:PORT (443 when no port is given).
    #[arg(long, value_name = "HOST[:PORT]", group = "request")]
    host: Option<String>,
    /// The environment variable NAME of a command.
    #[arg(long, value_name = "NAME", group = "request")]
    env: Option<String>,
    /// An agent verb: exec, file_read, file_write (a copy in from the host), files_anywhere,
    /// terminal, client_env, egress, port_forward, unbound_secret.
    #[arg(long, value_name = "VERB", group = "request")]
    verb: Option<String>,
}

/// The verbs `--verb` knows, in the order `mvm policy show` lists them.
const VERBS: [&str; 9] = [
    "exec",
    "file_read",
    "file_write",
    "files_anywhere",
    "terminal",
    "client_env",
    "egress",
    "port_forward",
    "unbound_secret",
];

/// One request's answer: allowed or not, and the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub rule: String,
}

fn allow(rule: impl Into<String>) -> Verdict {
    Verdict {
        allowed: true,
        rule: rule.into(),
    }
}

fn deny(rule: impl Into<String>) -> Verdict {
    Verdict {
        allowed: false,
        rule: rule.into(),
    }
}

/// What a request is judged against: a plan's policy, or a bare profile's.
struct Subject {
    profile: Profile,
    grants: Grants,
    plan: Option<LaunchPlan>,
}

impl Subject {
    fn of_plan(plan: LaunchPlan) -> Self {
        Subject {
            profile: plan.policy.profile,
            grants: plan.policy.grants,
            plan: Some(plan),
        }
    }

    fn of_profile(profile: Profile) -> Self {
        Subject {
            profile,
            grants: profile.grants(false),
            plan: None,
        }
    }

    fn networked(&self) -> bool {
        self.plan.as_ref().is_some_and(LaunchPlan::is_networked)
    }
}

pub fn run(command: PolicyCommand, out: &Output) -> anyhow::Result<ExitCode> {
    let host = Host::open()?;
    let host_policy = HostPolicy::load(&host.home).map_err(|e| coded_as("RUN059", e))?;
    match command {
        PolicyCommand::Show { plan: None } => {
            let profiles: Vec<Value> = Profile::ALL
                .into_iter()
                .map(|p| profile_json(p, &p.grants(false)))
                .collect();
            let report = json!({"profiles": profiles, "host": host_json(&host_policy)});
            out.result(report, || {
                let mut text = String::new();
                for profile in Profile::ALL {
                    text.push_str(&profile_text(profile, &profile.grants(false)));
                }
                text.push_str(&host_text(&host_policy));
                text
            });
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Show { plan: Some(path) } => {
            let plan = signed_plan(&host, &path)?;
            let runs_here = host_policy.check(&plan);
            let p = &plan.policy;
            let mut report = profile_json(p.profile, &p.grants);
            report["resources"] = json!(plan.resources);
            report["network"] = json!(p.network);
            report["egress"] = json!(p.egress);
            report["ports"] = json!(p.ports);
            report["env"] = json!(p.env.keys().collect::<Vec<_>>());
            report["secrets"] = json!(p.secrets.iter().map(|s| &s.name).collect::<Vec<_>>());
            report["host"] = host_json(&host_policy);
            report["runs_here"] = json!(runs_here.is_ok());
            if let Err(e) = &runs_here {
                report["refused_because"] = json!(e.to_string());
            }
            out.result(report, || {
                let mut text = profile_text(p.profile, &p.grants);
                text.push_str(&format!(
                    "  resources: {} vCPUs, {} MiB\n  egress: {}\n  ports: {}\n  env: {}\n  secrets: {}\n",
                    plan.resources.cpu_cores,
                    plan.resources.memory_mb,
                    list(p.egress.iter().map(|g| format!("{}:{}", g.host, g.port))),
                    list(p.ports.iter().map(|f| f.guest.to_string())),
                    list(p.env.keys().cloned()),
                    list(p.secrets.iter().map(|s| format!("{} ({})", s.env, s.name))),
                ));
                text.push_str(&host_text(&host_policy));
                match &runs_here {
                    Ok(()) => text.push_str("this host runs it"),
                    Err(e) => text.push_str(&format!("this host refuses it: {e}")),
                }
                text
            });
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain(args) => {
            let subject = match &args.plan {
                Some(path) => Subject::of_plan(signed_plan(&host, path)?),
                None => Subject::of_profile(args.profile.unwrap_or(Profile::Standard)),
            };
            let (request, verdict) = match (&args.host, &args.env, &args.verb) {
                (Some(target), _, _) => (
                    format!("host {target}"),
                    explain_host(&subject, &host_policy, target)?,
                ),
                (_, Some(name), _) => (
                    format!("env {name}"),
                    explain_env(&subject, &host_policy, name),
                ),
                (_, _, Some(verb)) => (
                    format!("verb {verb}"),
                    explain_verb(&subject, &host_policy, verb)?,
                ),
                _ => {
                    return Err(coded_as(
                        "RUN029",
                        "ask about one of --host, --env or --verb",
                    ))
                }
            };
            let report = json!({
                "request": request,
                "profile": subject.profile,
                "allowed": verdict.allowed,
                "rule": verdict.rule,
            });
            out.result(report, || {
                let word = if verdict.allowed { "allowed" } else { "denied" };
                format!("{request}: {word} — {}", verdict.rule)
            });
            // Denied is an answer, not a failure: said once above, exit 1.
            Ok(ExitCode::from(u8::from(!verdict.allowed)))
        }
    }
}

/// The verified plan at `path` (an envelope or a bundle directory), signed by a key this host
/// trusts.
fn signed_plan(host: &Host, path: &Path) -> anyhow::Result<LaunchPlan> {
    let envelope = match path.is_dir() {
        true => path.join("plan.dsse.json"),
        false => path.to_path_buf(),
    };
    let bytes = mvm_ir::fsutil::read_capped(&envelope, MAX_ENVELOPE_BYTES, "plan envelope")?;
    let trust = host.keys.trust_store()?;
    let verified =
        verify_signed_plan(&bytes, &trust, time::OffsetDateTime::now_utc()).map_err(coded)?;
    Ok(verified.plan)
}

/// A connection to `target` (`HOST[:PORT]`, IPv6 literals in brackets).
fn explain_host(subject: &Subject, host: &HostPolicy, target: &str) -> anyhow::Result<Verdict> {
    let grant = crate::commands::build::parse_grant(target).map_err(|e| coded_as("RUN029", e))?;
    let authority = Authority::parse(&grant.host, grant.port).map_err(|e| coded_as("RUN029", e))?;
    if !host.allow_egress {
        return Ok(deny(
            "this host's config.toml [policy] allow_egress = false",
        ));
    }
    if !subject.profile.allows_network() {
        return Ok(deny(format!(
            "the {} profile grants no egress",
            subject.profile
        )));
    }
    let grants = subject.plan.iter().flat_map(|p| p.policy.egress.iter());
    for granted in grants {
        let matched = Grant::from_plan(granted).is_ok_and(|g| g.matches(&authority));
        if matched {
            return Ok(allow(format!(
                "the plan's egress grant {}:{}; each address the name resolves to is then judged as it connects (docs/network.md)",
                granted.host, granted.port
            )));
        }
    }
    Ok(deny(format!(
        "no egress grant of the plan names {}:{} (nothing is reachable unless granted)",
        grant.host, grant.port
    )))
}

/// The variable `name` of a command's environment.
fn explain_env(subject: &Subject, host: &HostPolicy, name: &str) -> Verdict {
    if !mvm_ir::validate::is_env_name(name) {
        return deny(format!("{name:?} is not a variable name"));
    }
    if mvm_ir::env::is_denied(name) {
        return deny(
            "the environment denylist: loader, shell, interpreter and password-manager variables never reach a workload (docs/ir.md#the-environment-denylist)",
        );
    }
    if let Some(plan) = &subject.plan {
        if plan.policy.env.contains_key(name) {
            return allow("the plan sets it (a literal signed into the plan)");
        }
        if let Some(secret) = plan.policy.secrets.iter().find(|s| s.env == name) {
            return allow(format!(
                "the plan names the secret {:?} for it, resolved on the host at launch",
                secret.name
            ));
        }
    }
    client_env(subject, host)
}

fn client_env(subject: &Subject, host: &HostPolicy) -> Verdict {
    if !subject.grants.client_env {
        return deny(format!(
            "the {} profile lets no client set a command's environment",
            subject.profile
        ));
    }
    if !host.allow_client_env {
        return deny("this host's config.toml [policy] allow_client_env = false");
    }
    allow(format!(
        "the {} profile lets a client set it (--env, --allow-env, exec --env)",
        subject.profile
    ))
}

/// An agent verb.
fn explain_verb(subject: &Subject, host: &HostPolicy, verb: &str) -> anyhow::Result<Verdict> {
    let profile = subject.profile;
    let grants = &subject.grants;
    let by_grant = |granted: bool, grant: &str, what: &str| match granted {
        true => allow(format!("the {profile} profile grants {grant}: {what}")),
        false => deny(format!(
            "the {profile} profile does not grant {grant}: {what}"
        )),
    };
    Ok(match verb {
        "exec" if !grants.any_command => allow(
            "the plan runs only its entrypoint's program, as the workload user (built with --only-entrypoint)",
        ),
        "exec" => allow("every profile runs commands, as the workload user, never root"),
        "file_write" if !grants.any_command => {
            deny("the plan lets clients change no file (built with --only-entrypoint)")
        }
        "file_read" => allow("every profile copies files out of /tmp and the workload user's home"),
        "file_write" => by_grant(
            grants.host_copy,
            "host_copy",
            "files copied in from the host",
        ),
        "files_anywhere" => by_grant(
            grants.files_anywhere,
            "files_anywhere",
            "file operations beyond /tmp and the workload user's home",
        ),
        "terminal" => by_grant(grants.terminal, "terminal", "an interactive terminal"),
        "client_env" => client_env(subject, host),
        "unbound_secret" => by_grant(
            grants.unbound_secrets,
            "unbound_secrets",
            "a secret's value handed to a command",
        ),
        "egress" | "port_forward" if !host.allow_egress => {
            deny("this host's config.toml [policy] allow_egress = false")
        }
        "egress" | "port_forward" if !profile.allows_network() => deny(format!(
            "the {profile} profile grants no egress and forwards no ports"
        )),
        "egress" | "port_forward" if subject.plan.is_some() && !subject.networked() => deny(
            "the plan grants no egress and forwards no ports (nothing is reachable unless granted)",
        ),
        "egress" => allow(format!(
            "the {profile} profile allows egress to the hosts a plan grants"
        )),
        "port_forward" => allow(format!(
            "the {profile} profile allows forwarded ports (a plan's, `mvm up --port`)"
        )),
        other => {
            return Err(coded_as(
                "RUN029",
                format!("{other:?} is not a verb: {}", VERBS.join(", ")),
            ))
        }
    })
}

fn profile_json(profile: Profile, grants: &Grants) -> Value {
    let ceilings = profile.ceilings();
    json!({
        "profile": profile,
        "grants": grants,
        "network": profile.allows_network(),
        "ceilings": ceilings,
        "needs_ack": profile.needs_acknowledgement(),
    })
}

fn profile_text(profile: Profile, grants: &Grants) -> String {
    let ceilings = profile.ceilings();
    let yes = |b: bool| if b { "yes" } else { "no" };
    format!(
        "{profile}: seccomp {}{}, egress/ports {}, client env {}, host copy {}, files anywhere {}, terminal {}, unbound secrets {}; at most {} vCPUs, {} MiB{}\n",
        grants.seccomp.name(),
        if grants.inet { " (+inet)" } else { "" },
        yes(profile.allows_network()),
        yes(grants.client_env),
        yes(grants.host_copy),
        yes(grants.files_anywhere),
        yes(grants.terminal),
        yes(grants.unbound_secrets),
        ceilings.cpu_cores,
        ceilings.memory_mb,
        if profile.needs_acknowledgement() { "; needs --ack-permissive" } else { "" },
    )
}

fn host_json(host: &HostPolicy) -> Value {
    json!({
        "max_profile": host.max_profile,
        "max_cpu_cores": host.max_cpu_cores,
        "max_memory_mb": host.max_memory_mb,
        "allow_egress": host.allow_egress,
        "allow_client_env": host.allow_client_env,
    })
}

fn host_text(host: &HostPolicy) -> String {
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    format!(
        "this host ([policy] of config.toml): max profile {}, max vCPUs {}, max memory {}, egress {}, client env {}\n",
        or_none(host.max_profile.map(|p| p.to_string())),
        or_none(host.max_cpu_cores.map(|c| c.to_string())),
        or_none(host.max_memory_mb.map(|m| format!("{m} MiB"))),
        if host.allow_egress { "allowed" } else { "never" },
        if host.allow_client_env { "allowed" } else { "never" },
    )
}

fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    match items.is_empty() {
        true => "none".into(),
        false => items.join(", "),
    }
}
