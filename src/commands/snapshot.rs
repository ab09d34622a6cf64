//! `mvm snapshot ls | rm | prune | make`: the boot snapshots of this home
//! (`docs/boot-snapshots.md`). The store and its checks are `mvm_runner::boot_snapshot`'s;
//! making one is the runner's (`--prepare-snapshot`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use mvm_ir::home::MvmHome;
use mvm_runner::boot_snapshot::{Budget, Listed, Store};
use serde_json::{json, Value};

use super::bundle::{plan_to_boot, runner_command, BuildReport, ImageOptions};
use super::{coded, coded_as};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List the boot snapshots: key, plan digest, backend, size, when made and last used, and
    /// whether it verifies (one that does not is never used, and is made anew); and the disk
    /// they take against the store's budget (`[boot_snapshots] max_disk_mib` in config.toml,
    /// default 8192: over it, the least recently used are removed as a new one is made).
    Ls,
    /// Remove boot snapshots by key (or a unique prefix of at least 12 hex digits); the next
    /// launch of their plan boots and makes one anew.
    Rm {
        /// The snapshots.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Remove the boot snapshots that do not verify, and what a making killed mid-way left;
    /// with --older-than also those not used within that long, with --all every one.
    Prune {
        /// Also those not restored (or made) within this long: `7d`, `12h`.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        older_than: Option<Duration>,
        /// Every boot snapshot.
        #[arg(long, conflicts_with = "older_than")]
        all: bool,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make the boot snapshot of an image's or a plan's launch ahead of time — boot it, save
    /// it once its agent is ready — and check it: restore it, see the agent answer. Nothing is
    /// made again for a snapshot that is there and verifies.
    Make {
        /// The image, REFERENCE@sha256:<digest>.
        #[arg(required_unless_present = "plan", conflicts_with = "plan")]
        image: Option<String>,
        /// A signed plan (`plan.dsse.json` of a bundle).
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        #[command(flatten)]
        image_options: Box<ImageOptions>,
        /// Give up when the guest is not ready after this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
        boot_timeout: Duration,
    },
}

pub fn run(command: SnapshotCommand, out: &Output) -> anyhow::Result<()> {
    let home = MvmHome::from_env().map_err(coded)?;
    let store = Store::of(&home).map_err(coded)?;
    match command {
        SnapshotCommand::Ls => ls(&store, Budget::load(&home).map_err(coded)?, out),
        SnapshotCommand::Rm { keys } => rm(&store, &keys, out),
        SnapshotCommand::Prune {
            older_than,
            all,
            dry_run,
        } => prune(&store, older_than, all, dry_run, out),
        SnapshotCommand::Make {
            image,
            plan,
            image_options,
            boot_timeout,
        } => make(
            plan.as_deref(),
            image.as_deref(),
            &image_options,
            boot_timeout,
            out,
        ),
    }
}

fn listed_json(listed: &Listed) -> Value {
    let used = listed
        .used
        .map(|time| mvm_ir::plan::Timestamp(time.into()).to_string());
    match &listed.manifest {
        Ok(manifest) => json!({
            "key": listed.key,
            "verified": true,
            "plan_digest": manifest.shape.plan_digest,
            "backend": manifest.shape.backend,
            "accel": manifest.shape.accel,
            "backend_version": manifest.shape.backend_version,
            "vcpus": manifest.shape.vcpus,
            "memory_mib": manifest.shape.memory_mib,
            "bytes": listed.bytes,
            "made_at": manifest.made_at.to_string(),
            "made_by": manifest.made_by,
            "used_at": used,
        }),
        Err(why) => json!({
            "key": listed.key,
            "verified": false,
            "reason": why,
            "bytes": listed.bytes,
            "used_at": used,
        }),
    }
}

fn ls(store: &Store, budget: Budget, out: &Output) -> anyhow::Result<()> {
    let listed = store.list().context("listing the boot snapshots")?;
    let values: Vec<Value> = listed.iter().map(listed_json).collect();
    let used: u64 = listed.iter().map(|entry| entry.bytes).sum();
    let value =
        json!({"snapshots": values, "disk_bytes": used, "max_disk_bytes": budget.max_bytes});
    out.result(value, || {
        let mut text = format!(
            "{:<14} {:<21} {:<10} {:>9}  {:<21} STATUS",
            "KEY", "PLAN", "BACKEND", "SIZE", "MADE"
        );
        for (entry, value) in listed.iter().zip(&values) {
            let plan = value["plan_digest"].as_str().unwrap_or("-");
            let backend = match (value["backend"].as_str(), value["accel"].as_str()) {
                (Some(backend), Some(accel)) => format!("{backend}/{accel}"),
                _ => "-".into(),
            };
            let status = match &entry.manifest {
                Ok(_) => "ok".to_string(),
                Err(why) => format!("refused: {why}"),
            };
            text.push_str(&format!(
                "\n{:<14} {:<21} {:<10} {:>8}M  {:<21} {status}",
                &entry.key[..12.min(entry.key.len())],
                plan.get(..19).unwrap_or(plan),
                backend,
                entry.bytes.div_ceil(1 << 20),
                value["made_at"].as_str().unwrap_or("-"),
            ));
        }
        text.push_str(&format!(
            "\n{} MiB of {} MiB (config.toml [boot_snapshots] max_disk_mib)",
            used.div_ceil(1 << 20),
            budget.max_bytes >> 20
        ));
        text
    });
    Ok(())
}

/// The key `wanted` names: itself, or the one key a prefix of at least 12 hex digits starts.
fn resolve(listed: &[Listed], wanted: &str) -> anyhow::Result<String> {
    if wanted.len() < 12 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(coded_as(
            "RUN064",
            format!("{wanted:?}: give a boot snapshot's key or at least 12 of its hex digits"),
        ));
    }
    let mut found = listed.iter().filter(|entry| entry.key.starts_with(wanted));
    match (found.next(), found.next()) {
        (Some(entry), None) => Ok(entry.key.clone()),
        (None, _) => Err(coded_as(
            "RUN064",
            format!("there is no boot snapshot {wanted}"),
        )),
        (Some(_), Some(_)) => Err(coded_as(
            "RUN064",
            format!("{wanted} names more than one boot snapshot: give more of its key"),
        )),
    }
}

fn rm(store: &Store, keys: &[String], out: &Output) -> anyhow::Result<()> {
    let listed = store.list().context("listing the boot snapshots")?;
    let keys = keys
        .iter()
        .map(|wanted| resolve(&listed, wanted))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for key in &keys {
        store.remove(key).map_err(coded)?;
    }
    out.result(json!({"removed": keys}), || {
        keys.iter()
            .map(|key| format!("removed {key}"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

fn prune(
    store: &Store,
    older_than: Option<Duration>,
    all: bool,
    dry_run: bool,
    out: &Output,
) -> anyhow::Result<()> {
    let listed = store.list().context("listing the boot snapshots")?;
    let now = SystemTime::now();
    let stale = |entry: &Listed| match older_than {
        Some(limit) => entry
            .used
            .and_then(|used| now.duration_since(used).ok())
            .is_none_or(|age| age > limit),
        None => false,
    };
    let mut removed = Vec::new();
    let mut freed = 0u64;
    for entry in &listed {
        if all || entry.manifest.is_err() || stale(entry) {
            if !dry_run {
                store.remove(&entry.key).map_err(coded)?;
            }
            removed.push(entry.key.clone());
            freed += entry.bytes;
        }
    }
    // What killed makings and removals left: never a snapshot, always garbage.
    let leftovers = store
        .leftovers()
        .context("looking for what killed makings left")?;
    for (dir, bytes) in &leftovers {
        if !dry_run {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        freed += bytes;
    }
    out.result(
        json!({"removed": removed, "leftovers": leftovers.len(), "bytes": freed, "dry_run": dry_run}),
        || {
            let verb = if dry_run { "would remove" } else { "removed" };
            let partial = match leftovers.len() {
                0 => String::new(),
                n => format!(" and {n} left by a killed making"),
            };
            format!(
                "{verb} {} boot snapshot(s){partial}, {} MiB",
                removed.len(),
                freed.div_ceil(1 << 20)
            )
        },
    );
    Ok(())
}

fn make(
    plan: Option<&std::path::Path>,
    image: Option<&str>,
    options: &ImageOptions,
    boot_timeout: Duration,
    out: &Output,
) -> anyhow::Result<()> {
    let plan = plan_to_boot(plan, image, options, &[], BuildReport::Stderr)?;
    let mut runner = runner_command(boot_timeout)?;
    runner
        .arg("--plan")
        .arg(&plan)
        .arg("--prepare-snapshot")
        .stdout(Stdio::piped());
    options.configure_runner(&mut runner)?;
    let done = runner.output().context("starting mvm-runner")?;
    if !done.status.success() {
        // The runner's JSON failure report: its code and message.
        let report: Value = serde_json::from_slice(&done.stdout).unwrap_or_default();
        let code = report["error"]["code"].as_str().unwrap_or("RUN063");
        let message = report["error"]["message"]
            .as_str()
            .unwrap_or("the runner failed");
        return Err(coded_as(code, message.to_string()));
    }
    let made: Value = serde_json::from_slice(&done.stdout).context("the runner's report")?;
    out.result(made.clone(), || {
        format!(
            "boot snapshot {} of plan {} checked: restored and ready in {} ms",
            made["key"].as_str().unwrap_or("?"),
            made["plan_digest"].as_str().unwrap_or("?"),
            made["ready_ms"]
        )
    });
    Ok(())
}
