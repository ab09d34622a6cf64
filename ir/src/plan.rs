//! Launch plan v1: everything the runner needs, pinned, and nothing it must decide.
//!
//! A plan names the kernel, initramfs and root filesystem image by sha256 (plus the dm-verity
//! parameters that protect the image), the resources, the resolved policy, the entrypoint, a
//! validity window and a random nonce. It travels inside a DSSE envelope of type
//! [`PAYLOAD_TYPE`]; [`crate::admission`] decides whether a signed plan may start a VM.
//! A plan is reusable while valid unless `single_use` is set, in which case its nonce is admitted
//! once.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::digest::{is_lower_hex, is_prefixed_sha256, is_sha256_hex};
use crate::env::is_denied;
use crate::policy::Grants;
pub use crate::policy::Profile;
use crate::validate::{is_egress_host, is_env_name, is_guest_path, is_identifier};
use crate::workload::{EgressGrant, HealthCheck, Mount, NetworkMode, PortForward, RestartPolicy};
use crate::Error;
use mvm_protocol::service::{is_http_path, is_service_name};

/// The plan schema version this build reads and writes.
pub const SCHEMA_VERSION: &str = "1";

/// The DSSE payload type of a launch plan.
pub const PAYLOAD_TYPE: &str = "application/vnd.mvm.plan.v1+json";

/// The largest signed plan envelope mvm reads.
pub const MAX_ENVELOPE_BYTES: u64 = 1024 * 1024;

/// A launch plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LaunchPlan {
    /// Always `"1"` for this version.
    pub schema_version: String,
    /// The workload's `id`.
    pub workload_id: String,
    /// The app's `name` within the workload.
    pub app: String,
    /// `sha256:` digest of the workload IR's canonical JSON.
    pub ir_digest: String,
    /// The guest kernel.
    pub kernel: KernelPin,
    /// The initramfs holding the guest agent as `/init`.
    pub initramfs: ArtifactPin,
    /// The read-only root filesystem image and its verity tree.
    pub rootfs: RootfsPin,
    /// vCPUs and memory.
    pub resources: PlanResources,
    /// The policy, resolved from profile and grants.
    pub policy: ResolvedPolicy,
    /// The command run by default.
    pub entrypoint: PlanEntrypoint,
    /// The long-running processes a named VM starts before it is ready (the app's service
    /// entrypoints), as the entrypoint's user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<PlanService>,
    /// How the readiness of the services is probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Start of the validity window (RFC 3339).
    pub valid_from: Timestamp,
    /// End of the validity window (RFC 3339).
    pub valid_until: Timestamp,
    /// 16 random bytes in hex; identifies a single-use plan in the admission ledger.
    pub nonce: String,
    /// Whether the plan may be admitted only once.
    pub single_use: bool,
}

/// A file of the plan bundle, pinned by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactPin {
    /// File name inside the plan's directory (no `/`).
    pub path: String,
    /// `sha256:` digest of the file's bytes.
    pub digest: String,
}

/// The kernel and the command line it boots with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KernelPin {
    /// File name inside the plan's directory (no `/`).
    pub path: String,
    /// `sha256:` digest of the file's bytes.
    pub digest: String,
    /// The kernel command line, signed with the rest (it carries the verity root hash).
    pub cmdline: String,
}

/// The root filesystem image and its dm-verity protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RootfsPin {
    /// File name of the EROFS image inside the plan's directory.
    pub path: String,
    /// `sha256:` digest of the image.
    pub digest: String,
    /// The verity hash tree over the image.
    pub verity: VerityPin,
}

/// dm-verity parameters, as `veritysetup` names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerityPin {
    /// File name of the hash tree inside the plan's directory.
    pub path: String,
    /// `sha256:` digest of the hash tree file.
    pub digest: String,
    /// Root hash of the tree, hex.
    pub root_hash: String,
    /// Salt, hex (at most 256 bytes).
    pub salt: String,
    /// Always `sha256`.
    pub hash_algorithm: String,
    /// Data block size in bytes (power of two, 512 to 65536).
    pub data_block_size: u32,
    /// Hash block size in bytes (power of two, 512 to 65536).
    pub hash_block_size: u32,
    /// Number of data blocks covered.
    pub data_blocks: u64,
    /// Byte offset of the verity superblock within the hash tree file.
    pub hash_offset: u64,
}

/// Resources of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanResources {
    /// vCPUs, 1 to 32.
    pub cpu_cores: u32,
    /// Guest memory in MiB, 64 to 65536.
    pub memory_mb: u32,
}

/// The policy the runner enforces, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedPolicy {
    /// The profile the policy was resolved from.
    pub profile: Profile,
    /// What the profile lets the plan's commands and clients do.
    pub grants: Grants,
    /// Network mode.
    pub network: NetworkMode,
    /// Granted egress destinations (empty unless `network` is `allowlist`).
    #[serde(default)]
    pub egress: Vec<EgressGrant>,
    /// Guest ports forwarded to the host's loopback.
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// Literal environment variables of the workload process.
    #[serde(default, deserialize_with = "crate::workload::unique_keys")]
    pub env: BTreeMap<String, String>,
    /// Secrets, by name only: resolved on the host at launch.
    #[serde(default)]
    pub secrets: Vec<SecretBinding>,
    /// Volume mounts.
    #[serde(default)]
    pub mounts: Vec<Mount>,
}

/// An environment variable whose value is a host-side secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretBinding {
    /// The variable set in the workload process.
    pub env: String,
    /// The secret's name in the host's secret store.
    pub name: String,
    /// If true, a missing secret leaves the variable unset.
    #[serde(default)]
    pub optional: bool,
}

/// The command the plan runs by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanEntrypoint {
    /// The argv.
    pub command: Vec<String>,
    /// Absolute working directory in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Who runs the plan's commands unless one names its own: a user of the image's
    /// `/etc/passwd` or `UID`, with `:GID` optionally (the image's `User`); never root. The
    /// workload user (1000) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A service a named VM starts and its guest agent keeps running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanService {
    /// Its name: 1–32 of `a-z 0-9 _ -`, unique in the plan.
    pub name: String,
    /// The argv.
    pub command: Vec<String>,
    /// Absolute working directory in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// When it is started again after it ended.
    pub restart: RestartPolicy,
    /// How many times it is started again at most (0–1000).
    pub max_restarts: u32,
}

/// Whether `spec` (`NAME`, `UID`, `NAME:GID`, `UID:GID`) names root's user or group by name or
/// number: commands never run as root, whatever an image asks.
pub fn is_root_user(spec: &str) -> bool {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let root = |s: &str| s == "root" || s.parse::<u32>() == Ok(0);
    root(user) || group.is_some_and(root)
}

/// A point in time, written as RFC 3339 in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub OffsetDateTime);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Timestamp(OffsetDateTime::now_utc())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let utc = self.0.to_offset(time::UtcOffset::UTC);
        match utc.format(&Rfc3339) {
            Ok(text) => f.write_str(&text),
            Err(_) => Err(fmt::Error),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let utc = self.0.to_offset(time::UtcOffset::UTC);
        let text = utc.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339)
            .map(Timestamp)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time"})
    }
}

/// Draws a fresh 16-byte nonce, hex.
pub fn fresh_nonce() -> Result<String, Error> {
    Ok(hex::encode(crate::random_bytes::<16>()?))
}

impl LaunchPlan {
    /// Checks the rules a strictly parsed plan must still meet; the first problem is returned as
    /// [`Error::InvalidPlan`].
    pub fn check(&self) -> Result<(), Error> {
        let fail = |msg: String| Err(Error::InvalidPlan(msg));
        if self.schema_version != SCHEMA_VERSION {
            return Err(Error::UnsupportedSchema {
                found: self.schema_version.clone(),
                supported: SCHEMA_VERSION,
            });
        }
        if !is_identifier(&self.workload_id) || !is_identifier(&self.app) {
            return fail(
                "workload_id and app must be identifiers ([a-z0-9][a-z0-9._-]{0,62})".into(),
            );
        }
        if !is_prefixed_sha256(&self.ir_digest) {
            return fail("ir_digest is not sha256:<64 hex>".into());
        }
        let artifacts = [
            ("kernel", &self.kernel.path, &self.kernel.digest),
            ("initramfs", &self.initramfs.path, &self.initramfs.digest),
            ("rootfs", &self.rootfs.path, &self.rootfs.digest),
            (
                "rootfs.verity",
                &self.rootfs.verity.path,
                &self.rootfs.verity.digest,
            ),
        ];
        for (what, path, digest) in artifacts {
            let bare = !path.is_empty()
                && path.len() <= 255
                && !path.contains('/')
                && !path.contains('\0')
                && path != "."
                && path != "..";
            if !bare {
                return fail(format!(
                    "{what}.path {path:?} must be a file name inside the plan directory"
                ));
            }
            if !is_prefixed_sha256(digest) {
                return fail(format!("{what}.digest is not sha256:<64 hex>"));
            }
        }
        if self.kernel.cmdline.len() > 4096 || self.kernel.cmdline.contains('\0') {
            return fail("kernel.cmdline is over 4096 bytes or contains NUL".into());
        }
        let verity = &self.rootfs.verity;
        if !is_sha256_hex(&verity.root_hash) {
            return fail("rootfs.verity.root_hash is not 64 lowercase hex digits".into());
        }
        let salt_ok = verity.salt.len() <= 512
            && verity.salt.len().is_multiple_of(2)
            && is_lower_hex(&verity.salt);
        if !salt_ok {
            return fail("rootfs.verity.salt must be at most 256 bytes of lowercase hex".into());
        }
        if verity.hash_algorithm != "sha256" {
            return fail(format!(
                "verity hash algorithm {:?} is not sha256",
                verity.hash_algorithm
            ));
        }
        for size in [verity.data_block_size, verity.hash_block_size] {
            if !size.is_power_of_two() || !(512..=65536).contains(&size) {
                return fail(format!(
                    "verity block size {size} is not a power of two in 512..=65536"
                ));
            }
        }
        if verity.data_blocks == 0 {
            return fail("rootfs.verity.data_blocks is 0".into());
        }
        if !(1..=32).contains(&self.resources.cpu_cores)
            || !(64..=65536).contains(&self.resources.memory_mb)
        {
            return fail("resources outside 1..=32 vCPUs and 64..=65536 MiB".into());
        }
        let env_names = self
            .policy
            .env
            .keys()
            .chain(self.policy.secrets.iter().map(|s| &s.env));
        for name in env_names {
            if !is_env_name(name) || is_denied(name) {
                return fail(format!(
                    "environment variable {name:?} is invalid or never passed to a workload"
                ));
            }
        }
        if self.policy.env.values().any(|v| v.contains('\0')) {
            return fail("an environment value contains NUL".into());
        }
        if let Some(secret) = self.policy.secrets.iter().find(|s| !is_identifier(&s.name)) {
            return fail(format!(
                "secret name {:?} is not an identifier",
                secret.name
            ));
        }
        if let Some(grant) = self
            .policy
            .egress
            .iter()
            .find(|g| g.port == 0 || !is_egress_host(&g.host))
        {
            return fail(format!(
                "egress grant {}:{} is invalid",
                grant.host, grant.port
            ));
        }
        let mount_ok = |m: &Mount| is_identifier(&m.volume) && is_guest_path(&m.target);
        if let Some(mount) = self.policy.mounts.iter().find(|m| !mount_ok(m)) {
            return fail(format!(
                "mount {:?} → {:?} is invalid",
                mount.volume, mount.target
            ));
        }
        if self
            .entrypoint
            .cwd
            .as_deref()
            .is_some_and(|cwd| !is_guest_path(cwd))
        {
            return fail("entrypoint.cwd is not an absolute guest path".into());
        }
        if let Some(user) = &self.entrypoint.user {
            let ok = !user.is_empty()
                && user.len() <= 256
                && !user.contains(['\0', '\n'])
                && !is_root_user(user);
            if !ok {
                return fail(format!(
                    "entrypoint.user {user:?} is empty, too long or root"
                ));
            }
        }
        if self.entrypoint.command.iter().any(|a| a.contains('\0')) {
            return fail("an entrypoint argument contains NUL".into());
        }
        self.check_services()?;
        if self.policy.network == NetworkMode::None && !self.policy.egress.is_empty() {
            return fail("egress grants in a plan whose network mode is none".into());
        }
        self.check_profile()?;
        if self.entrypoint.command.is_empty() || self.entrypoint.command[0].is_empty() {
            return fail("entrypoint.command is empty".into());
        }
        let nonce_ok = self.nonce.len() == 32 && is_lower_hex(&self.nonce);
        if !nonce_ok {
            return fail("nonce is not 16 bytes of lowercase hex".into());
        }
        if self.valid_until <= self.valid_from {
            return fail("valid_until is not after valid_from".into());
        }
        Ok(())
    }

    /// The services: names the agent takes, each once; argv without NUL; at most 1000
    /// restarts. A health check has exactly one probe, within its bounds, and services.
    fn check_services(&self) -> Result<(), Error> {
        let fail = |msg: String| Err(Error::InvalidPlan(msg));
        if self.services.len() > mvm_protocol::service::MAX_SERVICES {
            return fail(format!(
                "at most {} services",
                mvm_protocol::service::MAX_SERVICES
            ));
        }
        for (i, service) in self.services.iter().enumerate() {
            let repeated = self.services[..i].iter().any(|s| s.name == service.name);
            let argv_ok = service.command.first().is_some_and(|a| !a.is_empty())
                && service.command.iter().all(|a| !a.contains('\0'));
            let cwd_ok = service.cwd.as_deref().is_none_or(is_guest_path);
            if !is_service_name(&service.name) || repeated || !argv_ok || !cwd_ok {
                return fail(format!("service {:?} is invalid", service.name));
            }
            if service.max_restarts > 1000 {
                return fail(format!(
                    "service {:?} restarts over 1000 times",
                    service.name
                ));
            }
        }
        let Some(check) = &self.health_check else {
            return Ok(());
        };
        let probes = [
            check.command.as_ref().is_some_and(|argv| {
                argv.first().is_some_and(|a| !a.is_empty())
                    && argv.iter().all(|a| !a.contains('\0'))
            }),
            check.tcp_port.is_some_and(|port| port != 0),
            check
                .http
                .as_ref()
                .is_some_and(|http| http.port != 0 && is_http_path(&http.path)),
        ];
        let bounded = (1..=3600).contains(&check.interval_s)
            && (1..=check.interval_s).contains(&check.timeout_s)
            && (1..=100).contains(&check.retries)
            && check.start_period_s <= 3600;
        let given = [
            check.command.is_some(),
            check.tcp_port.is_some(),
            check.http.is_some(),
        ];
        if self.services.is_empty()
            || !bounded
            || given.iter().filter(|&&g| g).count() != 1
            || !probes.iter().any(|&ok| ok)
        {
            return fail("health_check is invalid, or there is no service to check".into());
        }
        Ok(())
    }

    /// Whether the plan grants egress or forwards ports.
    pub fn is_networked(&self) -> bool {
        !self.policy.egress.is_empty() || !self.policy.ports.is_empty()
    }

    /// The profile's rules: no network under `restrictive`, resources within the profile's
    /// ceilings, grants no wider than the profile's, and the kernel command line telling the
    /// agent exactly these grants.
    fn check_profile(&self) -> Result<(), Error> {
        let fail = |msg: String| Err(Error::InvalidPlan(msg));
        let profile = self.policy.profile;
        if !profile.allows_network() && self.is_networked() {
            return fail(format!(
                "the {profile} profile grants no egress and forwards no ports"
            ));
        }
        let most = profile.ceilings();
        if self.resources.cpu_cores > most.cpu_cores || self.resources.memory_mb > most.memory_mb {
            return fail(format!(
                "the {profile} profile allows at most {} vCPUs and {} MiB",
                most.cpu_cores, most.memory_mb
            ));
        }
        if let Some(grant) = self.policy.grants.wider_than(profile, self.is_networked()) {
            return fail(format!(
                "grants.{grant} is wider than the {profile} profile gives"
            ));
        }
        let word = self.policy.grants.cmdline_word();
        let said = self
            .kernel
            .cmdline
            .split_ascii_whitespace()
            .filter(|w| w.starts_with("mvm.policy="))
            .collect::<Vec<_>>();
        if said != [word.as_str()] {
            return fail(format!(
                "kernel.cmdline must carry {word} exactly once (the plan's grants)"
            ));
        }
        Ok(())
    }
}
