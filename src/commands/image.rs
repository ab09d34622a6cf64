//! `mvm image ls | rm | prune` and `mvm system df`: the image cache as a user sees it. The
//! rules (what is kept, what goes, in which order) are `mvm_builder::image_cache`'s; this
//! gathers the named VMs that need images and prints.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use mvm_builder::image_cache::{
    disk_usage, ImageCache, ImageEntry, Inventory, Prune, Removal, VmUse,
};
use mvm_ir::plan::Timestamp;
use mvm_runner::boot_snapshot;
use mvm_runner::named_vm::VmHome;
use mvm_runner::state::{Phase, VmState};
use serde_json::{json, Value};

use super::{coded, Host};
use crate::output::Output;

/// The testing hook that pauses a removal after this many entries (for a test to kill it);
/// read by debug builds only, which are what the tests run, so a release `mvm` has no such
/// switch.
const PAUSE_HOOK: &str = "MVM_TEST_PAUSE_AFTER_REMOVALS";

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the cached images: reference, digest, size, last use, the bundles built from it
    /// and the VMs that need it; then what no image names.
    Ls,
    /// Remove images from the cache: REFERENCE, REFERENCE@sha256:…, a digest, or a unique
    /// prefix of at least 12 hex digits. Blobs another image uses stay; bundles mvm keeps for
    /// it ($MVM_HOME/runs) go. Refused (CACHE004) while a named or cold VM needs it.
    Rm {
        /// The images.
        #[arg(required = true, value_name = "REF|DIGEST")]
        images: Vec<String>,
    },
    /// Remove what nothing needs: blobs no image names, bundles mvm keeps whose image is gone,
    /// leftovers of killed builds, damaged records; with --all also images no VM needs.
    Prune {
        /// Also remove images no named or cold VM needs (with the bundles mvm keeps for them).
        #[arg(long)]
        all: bool,
        /// Only what was not used (images) or changed (the rest) within this long: `7d`,
        /// `12h`, `30m`.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        older_than: Option<Duration>,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Disk use of mvm's state: images, bundles, VMs, cold states, blob cache, kernels, boot
    /// snapshots, and what `mvm image prune` (or `mvm rm`, `mvm snapshot prune`) could reclaim.
    Df,
}

pub fn run(command: ImageCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let cache = ImageCache::in_home(&host.home).map_err(coded)?;
    let vms = named_vms(&host);
    match command {
        ImageCommand::Ls => {
            let lock = cache.lock_shared().map_err(coded)?;
            let inventory = cache.inventory(&lock, &uses(&vms)).map_err(coded)?;
            drop(lock);
            ls(&inventory, out);
            Ok(())
        }
        ImageCommand::Rm { images } => {
            let lock = cache.lock_exclusive(waiting).map_err(coded)?;
            let mut removals = Vec::new();
            for arg in &images {
                let inventory = cache.inventory(&lock, &uses(&vms)).map_err(coded)?;
                let removal = inventory.plan_rm(arg).map_err(coded)?;
                cache.remove(&lock, &removal, pause_hook()).map_err(coded)?;
                removals.push(removal);
            }
            drop(lock);
            let freed: u64 = removals.iter().map(Removal::bytes).sum();
            let reports: Vec<Value> = removals.iter().map(removal_json).collect();
            out.result(json!({"removed": reports, "bytes_freed": freed}), || {
                let mut text = String::new();
                for removal in &removals {
                    text.push_str(&removal_text(removal, false));
                }
                text.push_str(&format!("freed {}", human_size(freed)));
                text
            });
            Ok(())
        }
        ImageCommand::Prune {
            all,
            older_than,
            dry_run,
        } => {
            let lock = cache.lock_exclusive(waiting).map_err(coded)?;
            let inventory = cache.inventory(&lock, &uses(&vms)).map_err(coded)?;
            let removal = inventory.plan_prune(Prune { all, older_than }, SystemTime::now());
            if !dry_run {
                cache.remove(&lock, &removal, pause_hook()).map_err(coded)?;
            }
            drop(lock);
            let mut report = removal_json(&removal);
            report["dry_run"] = json!(dry_run);
            report["bytes_freed"] = json!(if dry_run { 0 } else { removal.bytes() });
            out.result(report, || {
                let mut text = removal_text(&removal, dry_run);
                let verb = if dry_run { "would free" } else { "freed" };
                text.push_str(&format!("{verb} {}", human_size(removal.bytes())));
                text
            });
            Ok(())
        }
    }
}

fn waiting() {
    eprintln!("mvm: waiting for the builds using the image cache to finish");
}

fn pause_hook() -> Option<usize> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var(PAUSE_HOOK).ok().and_then(|n| n.parse().ok())
}

/// The named VMs (any state), a state file that cannot be read said on stderr.
fn named_vms(host: &Host) -> Vec<VmState> {
    VmHome::new(host.home.clone()).list(|dir, e| {
        eprintln!(
            "warning: {}: {e}; the images it may need are not protected",
            dir.display()
        )
    })
}

fn uses(vms: &[VmState]) -> Vec<VmUse> {
    vms.iter()
        .map(|vm| VmUse {
            name: vm.name.clone(),
            plan_digest: vm.plan_digest.clone(),
        })
        .collect()
}

fn ls(inventory: &Inventory, out: &Output) {
    for damaged in &inventory.damaged {
        if !out.is_json() {
            eprintln!(
                "warning[CACHE006]: {}: damaged image record, skipped ({}); `mvm image prune` removes it",
                damaged.path.display(),
                damaged.reason
            );
        }
    }
    let unreferenced: u64 = inventory.unreferenced_blobs.iter().map(|f| f.size).sum();
    let leftovers: u64 = inventory.leftovers.iter().map(|f| f.size).sum();
    let json = json!({
        "images": inventory.images.iter().map(image_json).collect::<Vec<_>>(),
        "unreferenced_blobs": {"count": inventory.unreferenced_blobs.len(), "size": unreferenced},
        "dangling_bundles": inventory.dangling_bundles.iter().map(|b| json!({
            "path": b.path, "size": b.size, "used_by": b.used_by})).collect::<Vec<_>>(),
        "leftovers": {"count": inventory.leftovers.len(), "size": leftovers},
        "damaged": inventory.damaged.iter().map(|d| json!({"path": d.path, "reason": d.reason})).collect::<Vec<_>>(),
    });
    out.result(json, || {
        let mut text = format!(
            "{:<40} {:<19} {:>10} {:<16} {:>7}  USED BY",
            "REFERENCE", "DIGEST", "SIZE", "LAST USED", "BUNDLES"
        );
        for image in &inventory.images {
            let record = &image.record;
            let mut reference = record.references.first().cloned().unwrap_or_default();
            if record.references.len() > 1 {
                reference.push_str(&format!(" (+{})", record.references.len() - 1));
            }
            text.push_str(&format!(
                "\n{:<40} {:<19} {:>10} {:<16} {:>7}  {}",
                reference,
                &record.digest[..19.min(record.digest.len())],
                human_size(image.size),
                ago(&record.last_used),
                image.bundles.len(),
                if image.used_by.is_empty() {
                    "-".to_string()
                } else {
                    image.used_by.join(", ")
                }
            ));
        }
        if !inventory.unreferenced_blobs.is_empty() {
            text.push_str(&format!(
                "\n{} no image names, {} (`mvm image prune` removes them)",
                count(inventory.unreferenced_blobs.len(), "blob"),
                human_size(unreferenced)
            ));
        }
        if !inventory.dangling_bundles.is_empty() {
            text.push_str(&format!(
                "\n{} whose image is gone (`mvm image prune` removes them)",
                count(inventory.dangling_bundles.len(), "kept bundle")
            ));
        }
        if !inventory.leftovers.is_empty() {
            text.push_str(&format!(
                "\n{} of interrupted builds, {}",
                count(inventory.leftovers.len(), "leftover"),
                human_size(leftovers)
            ));
        }
        text
    });
}

fn image_json(image: &ImageEntry) -> Value {
    let record = &image.record;
    json!({
        "digest": record.digest,
        "manifest_digest": record.manifest_digest,
        "references": record.references,
        "size": image.size,
        "unique_size": image.unique_size,
        "blobs": record.blobs.iter().map(|b| json!({"digest": b.digest, "size": b.size})).collect::<Vec<_>>(),
        "missing_blobs": image.missing,
        "first_pulled": record.first_pulled,
        "last_used": record.last_used,
        "bundles": image.bundles.iter().map(|b| json!({
            "path": b.path, "plan_digest": b.plan_digest, "size": b.size, "managed": b.managed,
            "used_by": b.used_by})).collect::<Vec<_>>(),
        "used_by": image.used_by,
    })
}

fn removal_json(removal: &Removal) -> Value {
    json!({
        "images": removal.images.iter().map(|i| json!({
            "digest": i.record.digest, "references": i.record.references})).collect::<Vec<_>>(),
        "blobs": removal.blobs.len(),
        "bundles": removal.bundles.iter().map(|b| &b.path).collect::<Vec<_>>(),
        "leftovers": removal.leftovers.len(),
        "damaged": removal.damaged.iter().map(|f| &f.path).collect::<Vec<_>>(),
        "kept": removal.kept.iter().map(|(digest, vms)| json!({"digest": digest, "needed_by": vms})).collect::<Vec<_>>(),
        "bytes": removal.bytes(),
    })
}

fn removal_text(removal: &Removal, dry_run: bool) -> String {
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut text = String::new();
    for image in &removal.images {
        text.push_str(&format!(
            "{verb} image {} {}\n",
            image.record.digest,
            image.record.references.join(", ")
        ));
    }
    for bundle in &removal.bundles {
        text.push_str(&format!("{verb} bundle {}\n", bundle.path.display()));
    }
    for damaged in &removal.damaged {
        text.push_str(&format!(
            "{verb} damaged record {}\n",
            damaged.path.display()
        ));
    }
    if !removal.blobs.is_empty() || !removal.leftovers.is_empty() {
        text.push_str(&format!(
            "{verb} {} and {}\n",
            count(removal.blobs.len(), "blob"),
            count(removal.leftovers.len(), "leftover")
        ));
    }
    for (digest, vms) in &removal.kept {
        text.push_str(&format!(
            "kept image {digest}: needed by VM {}\n",
            vms.join(", VM ")
        ));
    }
    text
}

pub fn system(command: SystemCommand, out: &Output) -> anyhow::Result<()> {
    let SystemCommand::Df = command;
    let host = Host::open()?;
    let cache = ImageCache::in_home(&host.home).map_err(coded)?;
    let vms = named_vms(&host);
    let lock = cache.lock_shared().map_err(coded)?;
    let inventory = cache.inventory(&lock, &uses(&vms)).map_err(coded)?;
    drop(lock);
    let now = SystemTime::now();
    let pruned = inventory.plan_prune(Prune::default(), now);
    let pruned_all = inventory.plan_prune(
        Prune {
            all: true,
            older_than: None,
        },
        now,
    );
    let bytes = |r: &Removal| r.blobs.iter().map(|f| f.size).sum::<u64>();
    let root = host.home.root();

    let mut blobs_seen = HashSet::new();
    let images_size: u64 = inventory
        .images
        .iter()
        .flat_map(|i| &i.record.blobs)
        .filter(|b| {
            blobs_seen.insert(b.digest.clone()) && !inventory_missing(&inventory, &b.digest)
        })
        .map(|b| b.size)
        .sum();
    let mut bundle_paths = HashSet::new();
    let bundles: Vec<_> = inventory
        .images
        .iter()
        .flat_map(|i| &i.bundles)
        .chain(&inventory.dangling_bundles)
        .filter(|b| bundle_paths.insert(b.path.clone()))
        .collect();
    let (vm_count, vm_size, vm_reclaimable, cold_count, cold_size) = vm_usage(root, &vms);
    let (blob_count, blob_size) = disk_usage(&root.join("cache/blobs"), &mut HashSet::new());
    let kernels = usage_of(&root.join("kernels"));
    let kernel_count = std::fs::read_dir(root.join("kernels"))
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count() as u64)
        .unwrap_or(0);
    let snapshots = boot_snapshot::Store::of(&host.home)
        .map_err(coded)?
        .list()
        .context("listing the boot snapshots")?;
    let snapshots_size = snapshots.iter().map(|s| s.bytes).sum();
    let mut state_size = 0;
    for sub in ["keys", "trust", "ledger", "audit", "receipts"] {
        state_size += usage_of(&root.join(sub));
    }
    let rows = [
        (
            "images",
            inventory.images.len() as u64,
            images_size,
            bytes(&pruned_all).saturating_sub(bytes(&pruned)),
        ),
        (
            "bundles",
            bundles.len() as u64,
            bundles.iter().map(|b| b.size).sum(),
            pruned_all.bundles.iter().map(|b| b.size).sum(),
        ),
        ("vms", vm_count, vm_size, vm_reclaimable),
        ("cold states", cold_count, cold_size, 0),
        (
            "blob cache",
            blob_count,
            blob_size,
            pruned
                .bytes()
                .saturating_sub(pruned.bundles.iter().map(|b| b.size).sum::<u64>()),
        ),
        ("kernels", kernel_count, kernels, 0),
        // Each is made anew by the next launch of its plan (`mvm snapshot prune --all`).
        (
            "boot snapshots",
            snapshots.len() as u64,
            snapshots_size,
            snapshots_size,
        ),
        ("keys, trust, ledger, audit", 0, state_size, 0),
    ];
    out.result(
        json!({"home": root, "usage": rows.iter().map(|(what, count, size, reclaimable)| json!({
            "what": what, "count": count, "size": size, "reclaimable": reclaimable})).collect::<Vec<_>>()}),
        || {
            let mut text = format!("{:<28} {:>6} {:>11} {:>12}", "TYPE", "COUNT", "SIZE", "RECLAIMABLE");
            for (what, count, size, reclaimable) in &rows {
                text.push_str(&format!(
                    "\n{:<28} {:>6} {:>11} {:>12}",
                    what,
                    count,
                    human_size(*size),
                    human_size(*reclaimable)
                ));
            }
            text
        },
    );
    Ok(())
}

fn inventory_missing(inventory: &Inventory, digest: &str) -> bool {
    inventory
        .images
        .iter()
        .any(|i| i.missing.iter().any(|m| m == digest))
}

fn usage_of(path: &Path) -> u64 {
    disk_usage(path, &mut HashSet::new()).1
}

/// Named VMs' directories without their cold states, what `mvm rm` frees of them (stopped and
/// failed ones), and the cold states.
fn vm_usage(root: &Path, vms: &[VmState]) -> (u64, u64, u64, u64, u64) {
    let (mut size, mut reclaimable, mut cold_count, mut cold_size) = (0, 0, 0, 0);
    for vm in vms {
        let dir = root.join("vms").join(&vm.name);
        let cold = usage_of(&dir.join("cold"));
        let own = usage_of(&dir).saturating_sub(cold);
        size += own;
        if matches!(vm.phase, Phase::Stopped | Phase::Failed) {
            reclaimable += own;
        }
        if dir.join("cold").exists() {
            cold_count += 1;
            cold_size += cold;
        }
    }
    (vms.len() as u64, size, reclaimable, cold_count, cold_size)
}

/// `1 blob`, `2 blobs`.
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `1.5 MiB`: binary units, one decimal.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `3 minutes ago`.
fn ago(time: &Timestamp) -> String {
    let seconds = (Timestamp::now().0 - time.0).whole_seconds().max(0) as u64;
    let (n, unit) = match seconds {
        0..60 => (seconds, "second"),
        60..3600 => (seconds / 60, "minute"),
        3600..86400 => (seconds / 3600, "hour"),
        _ => (seconds / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024), "5.0 MiB");
    }
}
