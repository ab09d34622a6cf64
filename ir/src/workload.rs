//! Workload IR v0: what a user declares.
//!
//! A [`Workload`] names one or more [`App`]s, each with the image its root filesystem comes from,
//! the resources it gets, the commands it runs, and what it may reach. Unknown fields are refused
//! everywhere, and every tagged union carries a `kind` field. [`crate::validate`] checks the rules
//! that types alone cannot express.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The IR schema version this build reads and writes.
pub const SCHEMA_VERSION: &str = "0";

/// A workload: the unit `mvm build` turns into images and launch plans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Always `"0"` for this version of the IR.
    pub schema_version: String,
    /// A short identifier: lowercase letters, digits, `.`, `_`, `-`.
    pub id: String,
    /// The apps of the workload; each becomes its own image and plan.
    pub apps: Vec<App>,
    /// Named volumes that apps mount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
}

/// One app: a root filesystem, resources, commands and grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Unique within the workload.
    pub name: String,
    /// Where the app's own code comes from, recorded in provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The image the root filesystem is built from.
    pub image: Image,
    /// vCPUs, memory and root filesystem size.
    pub resources: Resources,
    /// The commands the app runs; the first is the default.
    pub entrypoints: Vec<Entrypoint>,
    /// Environment of the workload process: literals, or references to host-side secrets.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_keys"
    )]
    pub env: BTreeMap<String, EnvValue>,
    /// Network grants. The default is no network at all.
    #[serde(default, skip_serializing_if = "Network::is_default")]
    pub network: Network,
    /// Volumes mounted into the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Small files written into the guest at launch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// How readiness of a long-running app is probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// How far the app's code is trusted; decides the default policy profile.
    #[serde(default, skip_serializing_if = "ThreatTier::is_default")]
    pub threat_tier: ThreatTier,
}

/// Deserializes a map whose every key is distinct. JSON parsers keep only one of two members
/// with the same name, silently, so the value run could differ from the one a reviewer read; a
/// repeated name is refused instead.
pub(crate) fn unique_keys<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueKeys<V>(std::marker::PhantomData<V>);

    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for UniqueKeys<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map with distinct keys")
        }

        fn visit_map<A>(self, mut map: A) -> Result<Self::Value, A::Error>
        where
            A: serde::de::MapAccess<'de>,
        {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    let message = format!("duplicate key {key:?}");
                    return Err(serde::de::Error::custom(message));
                }
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_map(UniqueKeys(std::marker::PhantomData))
}

/// Where an app's code comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A directory next to the declaration (relative path).
    Path {
        /// Path relative to the declaration file.
        path: String,
    },
    /// A git repository at a full commit hash.
    Git {
        /// `https://` or `ssh://` URL.
        url: String,
        /// The full 40-hex-digit commit.
        rev: String,
    },
}

/// The image a root filesystem is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Image {
    /// An OCI image, always pinned by its manifest digest.
    OciBase {
        /// `HOST[:PORT]/REPOSITORY`, without a tag.
        reference: String,
        /// `sha256:<64 hex>` of the manifest (or index).
        digest: String,
    },
    /// A set of Nix packages (attribute paths of nixpkgs).
    NixPackages {
        /// Attribute paths such as `python3` or `python3Packages.requests`.
        packages: Vec<String>,
    },
}

/// What the microVM gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// vCPUs, 1 to 32.
    pub cpu_cores: u32,
    /// Guest memory in MiB, 64 to 65536.
    pub memory_mb: u32,
    /// Upper bound on the root filesystem image in MiB, 16 to 1048576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_size_mb: Option<u32>,
}

/// A command the app runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Entrypoint {
    /// An argv, run without a shell.
    Command {
        /// The argv; `command[0]` is an absolute path or a name looked up in `PATH`.
        command: Vec<String>,
        /// Absolute working directory in the guest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// A long-running process: `mvm up` starts it in the background and the guest agent
    /// keeps it running as `restart` says; `mvm run` runs it in the foreground, as a command.
    Service {
        /// Names it (`mvm logs --service NAME`): 1–32 of `a-z 0-9 _ -`, unique in the app.
        name: String,
        /// The argv; `command[0]` is an absolute path or a name looked up in `PATH`.
        command: Vec<String>,
        /// Absolute working directory in the guest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        /// When it is started again after it ended; `on_failure` when absent.
        #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
        restart: RestartPolicy,
        /// How many times it is started again at most, 0 to 1000; 5 when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_restarts: Option<u32>,
    },
}

impl Entrypoint {
    /// The argv it runs.
    pub fn command(&self) -> &[String] {
        match self {
            Entrypoint::Command { command, .. } | Entrypoint::Service { command, .. } => command,
        }
    }

    /// Its working directory.
    pub fn cwd(&self) -> Option<&str> {
        match self {
            Entrypoint::Command { cwd, .. } | Entrypoint::Service { cwd, .. } => cwd.as_deref(),
        }
    }
}

/// The restarts a service gets when `max_restarts` is absent.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

/// When a service that ended is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Never.
    Never,
    /// When it exited with a status other than 0 or a signal ended it.
    #[default]
    OnFailure,
    /// Whatever its status.
    Always,
}

impl RestartPolicy {
    fn is_default(&self) -> bool {
        *self == RestartPolicy::default()
    }
}

/// The value of one environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EnvValue {
    /// A plain value, stored in the IR and the plan. Never a secret.
    Literal {
        /// The value.
        value: String,
    },
    /// A secret resolved on the host at launch; only its name is ever stored.
    SecretRef {
        /// The secret's name in the host's secret store.
        name: String,
        /// If true, a missing secret leaves the variable unset instead of failing the launch.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        optional: bool,
    },
}

/// Network grants of an app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// `none` (no network) or `allowlist` (egress through the host proxy to granted
    /// destinations only).
    #[serde(default)]
    pub mode: NetworkMode,
    /// Egress grants, used when `mode` is `allowlist`.
    #[serde(default, skip_serializing_if = "Egress::is_empty")]
    pub egress: Egress,
    /// Guest ports forwarded to the host's loopback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
}

impl Network {
    fn is_default(&self) -> bool {
        *self == Network::default()
    }
}

/// Whether an app has network access.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// No network: the guest has no NIC and no proxy.
    #[default]
    None,
    /// Egress only to the `egress.allowlist` destinations, through the host proxy.
    Allowlist,
}

/// Egress grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// Destinations the app may connect to.
    #[serde(default)]
    pub allowlist: Vec<EgressGrant>,
}

impl Egress {
    fn is_empty(&self) -> bool {
        self.allowlist.is_empty()
    }
}

/// One egress destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressGrant {
    /// A DNS name, `*.`-prefixed DNS suffix, or an IP address.
    pub host: String,
    /// The TCP port, 1 to 65535.
    pub port: u16,
}

/// A guest port exposed on the host's loopback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// The guest TCP port, 1 to 65535.
    pub guest: u16,
    /// The host loopback port; absent picks a free one at launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<u16>,
}

/// A named volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Unique within the workload.
    pub name: String,
    /// Size in MiB, 1 to 1048576.
    pub size_mb: u32,
}

/// A volume mounted into an app's guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// The name of a volume of the workload.
    pub volume: String,
    /// Absolute guest path.
    pub target: String,
    /// Mount read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// A small text file written into the guest at launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute guest path.
    pub path: String,
    /// The file's UTF-8 content, at most 1 MiB.
    pub content: String,
    /// Octal permission bits such as `"0644"`; default `"0644"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// How the readiness of a long-running app is probed, once its services started: exactly one
/// of `command`, `tcp_port` and `http`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// An argv run in the guest as the workload user; exit 0 means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A TCP port on the guest's loopback; an accepted connection means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    /// An HTTP `GET` on the guest's loopback; a 2xx or 3xx status means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// Seconds between probes, 1 to 3600.
    pub interval_s: u32,
    /// Seconds one probe may take, 1 to `interval_s`.
    pub timeout_s: u32,
    /// Consecutive failures before the app is unhealthy, 1 to 100.
    pub retries: u32,
    /// Seconds from the start during which failures do not count, 0 to 3600.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period_s: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An HTTP readiness probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// The guest's TCP port, 1 to 65535.
    pub port: u16,
    /// The path asked for: `/` and printable ASCII without spaces; `/` when absent.
    #[serde(default = "root_path")]
    pub path: String,
}

fn root_path() -> String {
    "/".into()
}

/// How far an app's code is trusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThreatTier {
    /// Code from an unknown or adversarial author (an LLM agent's code, a third-party tool).
    #[default]
    Untrusted,
    /// Code reviewed by its owner.
    Standard,
    /// The owner's own tooling.
    Trusted,
}

impl ThreatTier {
    fn is_default(&self) -> bool {
        *self == ThreatTier::default()
    }
}
