//! The API's documents: what requests carry and answers hold. The OpenAPI document
//! ([`crate::openapi`]) is generated from these types, so the contract and the code cannot
//! drift apart. Requests refuse unknown fields, like every other mvm input.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `POST /v1/sandboxes`: a sandbox to create, from an image or a signed plan.
#[derive(Debug, Default, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The image, `REFERENCE@sha256:<digest>` (a registry reference, `oci:DIR` or
    /// `oci-archive:FILE`), built into a cached, signed bundle as `mvm run` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Instead of an image: the path, on the host, of a signed plan (`plan.dsse.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Instead of an image: an E2B template name, which the host maps to a digest-pinned
    /// image (`[e2b.templates]` in `$MVM_HOME/config.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Its id (a VM name: 1-63 of `a-z 0-9 _ . -`); `sbx-` and random hex when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Virtual CPUs (images only: a plan's resources are signed into it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory in MiB (images only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Environment variables for every command run in it (a command's own win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    /// Egress grants, `HOST[:PORT]` (images only: signed into the image's plan; see
    /// `docs/network.md`). None: no network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// The policy profile of the image's plan: `restrictive`, `standard` (the default) or
    /// `dev` (images only: a plan's profile is signed into it; see `docs/policy.md`).
    /// `permissive` is built with `mvm build --ack-permissive`, never through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Secrets of the host's store, `NAME[:ENV]`, given to every command as `mvm up --secret`
    /// gives them: a bound secret as a placeholder, an unbound one as its value, scrubbed
    /// from output (`docs/secrets.md`). Values never cross the API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Encrypted volumes of the host's store (`mvm volume create`) to attach,
    /// `NAME:/GUEST/PATH[:ro]` as `mvm up --volume` takes them: ciphertext on the host, opened
    /// in the guest with dm-crypt, one sandbox at a time (RUN062 for a second); up to 8. A
    /// sandbox with volumes boots its kernel (boot snapshots hold no disks) (`docs/volumes.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Labels to find it by (`GET /v1/sandboxes?label=KEY=VALUE`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Seconds it lives while running before it is removed (unless extended with
    /// `POST /v1/sandboxes/{id}/timeout`); 300 when absent, 0 for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Boot its kernel even when its plan has a boot snapshot on this host, and make none
    /// (`mvm run --cold-boot`). By default it is restored from its plan's boot snapshot,
    /// made by the plan's first launch (`docs/boot-snapshots.md`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold_boot: bool,
}

/// A sandbox: a named VM with its labels and its time left.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Sandbox {
    /// Its id, which is also its VM's name in `mvm ls`.
    pub id: String,
    /// `starting`, `running`, `paused`, `cold`, `stopped` or `failed`.
    pub state: String,
    /// Its VM's id (as in audit entries and receipts).
    pub vm: String,
    /// The digest of the signed plan it runs.
    pub plan_digest: String,
    /// When its runner started it (RFC 3339).
    pub started_at: String,
    /// The boot snapshot (its key) its guest was restored from; absent when it booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_snapshot: Option<String>,
    /// Why it stopped or failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// When it will be removed (RFC 3339), if it has a timeout and runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SandboxList {
    /// The sandboxes, by id.
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/timeout`: its new time left.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds from now; 0 for no limit.
    pub timeout_s: u64,
}

/// `POST /v1/sandboxes/{id}/pause`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pause {
    /// Save it to disk as well: it then holds no memory and no process until resumed.
    #[serde(default)]
    pub cold: bool,
}

/// `POST /v1/sandboxes/{id}/commands`: a command to start.
#[derive(Debug, Default, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartCommand {
    /// The program and its arguments (no shell: give `["sh", "-c", "…"]` for one).
    pub argv: Vec<String>,
    /// Environment variables, over the sandbox's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    /// The working directory (default: the plan's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The guest user: a name from the image's `/etc/passwd`, or `UID[:GID]`; never root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Seconds before it is killed with everything it started; 60 when absent, 0 for the
    /// longest the agent allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Answer at once with its id (`201`) instead of streaming its events to its end.
    #[serde(default)]
    pub background: bool,
    /// Keep its standard input open for `POST …/commands/{cid}/stdin` (closed with
    /// `DELETE …/stdin`); otherwise it reads end of file.
    #[serde(default)]
    pub stdin: bool,
    /// Run it on a terminal of this size in the guest (`POST …/commands/{cid}/resize`
    /// changes it): its output, both streams as one, comes as `stdout` events, its input is
    /// kept open, and `TERM` is `xterm-256color` unless `envs` says otherwise. Only where the
    /// sandbox's plan grants a terminal (the `dev` profile, or `terminal` in the IR); refused
    /// with AGENT120 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

/// A terminal's size, for `pty` and `POST …/commands/{cid}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    /// Columns, 1–4096.
    pub cols: u16,
    /// Rows, 1–4096.
    pub rows: u16,
}

/// `201` to a background start.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CommandStarted {
    /// Its id in the sandbox (`GET …/commands/{cid}/events`, `…/signal`, `…/stdin`).
    pub id: u64,
}

/// One line of a command's event stream (`application/x-ndjson`): `started` first, output
/// as it comes, then exactly one `ended` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandEvent {
    /// It was asked of the agent.
    Started {
        /// Its id in the sandbox.
        id: u64,
    },
    /// Bytes it wrote to standard output, base64.
    Stdout {
        /// The bytes, base64 (standard alphabet, padded).
        data: String,
    },
    /// Bytes it wrote to standard error, base64.
    Stderr {
        /// The bytes, base64.
        data: String,
    },
    /// It ended.
    Ended(CommandEnd),
    /// It could not run (the agent refused it: no such program, a bad user …), or the
    /// channel to the sandbox failed; its code says which.
    Error(crate::error::ErrorDetail),
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandEnd {
    /// Its exit code; 128+N when signal N ended it, 124 when it timed out.
    pub exit_code: i32,
    /// The signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// It ran past its timeout and was killed.
    #[serde(default)]
    pub timed_out: bool,
    /// Milliseconds from its start to its end, as the host saw them.
    pub duration_ms: u64,
    /// The id of its signed run receipt (`GET /v1/receipts/{id}`).
    pub receipt: String,
    /// dm-verity refused a block of the root while it ran: its output cannot be trusted.
    #[serde(default)]
    pub integrity_failure: bool,
}

/// A command the API started in a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CommandInfo {
    /// Its id in the sandbox.
    pub id: u64,
    /// Its program and arguments.
    pub argv: Vec<String>,
    /// Whether it still runs.
    pub running: bool,
    /// How it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<CommandEnd>,
}

/// `GET /v1/sandboxes/{id}/commands`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CommandList {
    /// The commands still running, and those that ended recently, by id.
    pub commands: Vec<CommandInfo>,
}

/// `POST …/commands/{cid}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendSignal {
    /// The signal, 1-31 (9 kills, 15 asks to end).
    pub signal: i32,
}

/// A path in the sandbox, as listings and `stat` describe it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EntryInfo {
    /// Its last component.
    pub name: String,
    /// Its whole path.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner's uid.
    pub uid: u32,
    /// Last modification (RFC 3339).
    pub modified: String,
}

/// `GET …/files/list`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EntryList {
    /// The entries, directories before what they hold.
    pub entries: Vec<EntryInfo>,
    /// The agent listed only the first entries of a directory this large.
    #[serde(default)]
    pub truncated: bool,
}

/// `POST …/files/mkdir`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeDir {
    /// The directory (its parent must exist).
    pub path: String,
    /// Permission bits; 0o755 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `POST …/files/rename`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    /// The path now.
    pub from: String,
    /// Its new path (as rename(2): a file there is replaced).
    pub to: String,
}

/// `PUT …/files`: what was written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Written {
    /// The path.
    pub path: String,
    /// Bytes written.
    pub size: u64,
    /// Their SHA-256, `sha256:<hex>`, as the agent checked it.
    pub sha256: String,
}

/// `GET /v1/health`: the server and the protocol it speaks.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// mvm's version.
    pub version: String,
    /// The server's process id.
    pub pid: u32,
}
