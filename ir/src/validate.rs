//! Workload validation: every rule the types cannot express, each with a stable code.
//!
//! [`validate`] never stops at the first problem: it returns a [`Report`] of all of them, each with
//! its code (`IR001`…, warnings `IR1xx`), a JSON pointer into the document, and a message a person
//! can act on. A workload is accepted when the report holds no errors. The codes are listed in
//! `docs/ir.md`; a code, once published, keeps its meaning.

use std::collections::BTreeSet;
use std::fmt;

use mvm_protocol::service::{is_http_path, is_service_name};
use serde::Serialize;

use crate::digest::is_prefixed_sha256;
use crate::workload::{
    App, Entrypoint, EnvValue, Image, NetworkMode, Source, Workload, SCHEMA_VERSION,
};

/// Whether an issue blocks the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The workload is refused.
    Error,
    /// The workload is accepted, but something in it has no effect or looks like a mistake.
    Warning,
}

/// One problem found in a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    /// Stable code, e.g. `IR005`.
    pub code: &'static str,
    /// Error or warning.
    pub severity: Severity,
    /// RFC 6901 JSON pointer to the offending value.
    pub pointer: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Problems in document order.
    pub issues: Vec<Issue>,
}

impl Report {
    /// Whether any issue is an error.
    pub fn has_errors(&self) -> bool {
        self.issues.iter().any(|i| i.severity == Severity::Error)
    }

    fn error(
        &mut self,
        code: &'static str,
        pointer: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.push(code, Severity::Error, pointer.into(), message.into());
    }

    fn warning(
        &mut self,
        code: &'static str,
        pointer: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.push(code, Severity::Warning, pointer.into(), message.into());
    }

    fn push(&mut self, code: &'static str, severity: Severity, pointer: String, message: String) {
        self.issues.push(Issue {
            code,
            severity,
            pointer,
            message,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let severity = match issue.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            write!(
                f,
                "  {severity} {} at {}: {}",
                issue.code, issue.pointer, issue.message
            )?;
        }
        Ok(())
    }
}

/// Limits on counts and lengths, so a validated workload is bounded in size everywhere.
mod limits {
    pub const APPS: usize = 64;
    pub const ENTRYPOINTS: usize = 64;
    pub const ARGV: usize = 4096;
    pub const ENV: usize = 1024;
    pub const STRING: usize = 64 * 1024;
    pub const FILE_CONTENT: usize = 1024 * 1024;
    pub const PATH: usize = 4096;
    pub const LIST: usize = 1024;
    pub const CPU_CORES: std::ops::RangeInclusive<u32> = 1..=32;
    pub const MEMORY_MB: std::ops::RangeInclusive<u32> = 64..=65536;
    pub const ROOTFS_MB: std::ops::RangeInclusive<u32> = 16..=1_048_576;
    pub const VOLUME_MB: std::ops::RangeInclusive<u32> = 1..=1_048_576;
}

/// Words in a variable name that mean its value is a credential.
const SECRET_NAME_WORDS: &[&str] = &[
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "TOKEN",
    "API_KEY",
    "APIKEY",
    "PRIVATE_KEY",
    "ACCESS_KEY",
    "CREDENTIAL",
];

/// Prefixes of well-known credential formats.
const SECRET_VALUE_PREFIXES: &[&str] = &[
    "-----BEGIN",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "sk-",
    "sk_live_",
    "AKIA",
    "ASIA",
    "AIza",
];

/// Validates `workload` and returns every problem found.
pub fn validate(workload: &Workload) -> Report {
    let mut report = Report::default();
    if workload.schema_version != SCHEMA_VERSION {
        report.error(
            "IR001",
            "/schema_version",
            format!(
                "schema_version {:?} is not supported; this mvm reads {SCHEMA_VERSION:?}",
                workload.schema_version
            ),
        );
    }
    check_identifier(&mut report, "/id", "workload id", &workload.id);
    if workload.apps.is_empty() {
        report.error("IR003", "/apps", "a workload needs at least one app");
    }
    check_count(&mut report, "/apps", workload.apps.len(), limits::APPS);

    let mut app_names = BTreeSet::new();
    for (i, app) in workload.apps.iter().enumerate() {
        let at = format!("/apps/{i}");
        if !app_names.insert(app.name.as_str()) {
            report.error(
                "IR004",
                format!("{at}/name"),
                format!("duplicate app name {:?}", app.name),
            );
        }
        check_app(&mut report, &at, app, workload);
    }

    check_count(
        &mut report,
        "/volumes",
        workload.volumes.len(),
        limits::LIST,
    );
    let mounted: BTreeSet<&str> = workload
        .apps
        .iter()
        .flat_map(|a| &a.mounts)
        .map(|m| m.volume.as_str())
        .collect();
    let mut volume_names = BTreeSet::new();
    for (i, volume) in workload.volumes.iter().enumerate() {
        let at = format!("/volumes/{i}");
        check_identifier(
            &mut report,
            &format!("{at}/name"),
            "volume name",
            &volume.name,
        );
        if !volume_names.insert(volume.name.as_str()) {
            report.error(
                "IR004",
                format!("{at}/name"),
                format!("duplicate volume name {:?}", volume.name),
            );
        }
        if !limits::VOLUME_MB.contains(&volume.size_mb) {
            report.error(
                "IR008",
                format!("{at}/size_mb"),
                format!(
                    "volume size {} MiB is outside {:?}",
                    volume.size_mb,
                    limits::VOLUME_MB
                ),
            );
        }
        if !mounted.contains(volume.name.as_str()) {
            report.warning(
                "IR102",
                format!("{at}/name"),
                format!("volume {:?} is not mounted by any app", volume.name),
            );
        }
    }
    report
}

fn check_app(report: &mut Report, at: &str, app: &App, workload: &Workload) {
    check_identifier(report, &format!("{at}/name"), "app name", &app.name);
    if let Some(source) = &app.source {
        check_source(report, &format!("{at}/source"), source);
    }
    check_image(report, &format!("{at}/image"), &app.image);

    let r = &app.resources;
    if !limits::CPU_CORES.contains(&r.cpu_cores) {
        report.error(
            "IR008",
            format!("{at}/resources/cpu_cores"),
            format!(
                "cpu_cores {} is outside {:?}",
                r.cpu_cores,
                limits::CPU_CORES
            ),
        );
    }
    if !limits::MEMORY_MB.contains(&r.memory_mb) {
        report.error(
            "IR008",
            format!("{at}/resources/memory_mb"),
            format!(
                "memory_mb {} is outside {:?}",
                r.memory_mb,
                limits::MEMORY_MB
            ),
        );
    }
    if let Some(size) = r.rootfs_size_mb.filter(|s| !limits::ROOTFS_MB.contains(s)) {
        report.error(
            "IR008",
            format!("{at}/resources/rootfs_size_mb"),
            format!("rootfs_size_mb {size} is outside {:?}", limits::ROOTFS_MB),
        );
    }

    if app.entrypoints.is_empty() {
        report.error(
            "IR007",
            format!("{at}/entrypoints"),
            "an app needs at least one entrypoint",
        );
    }
    check_count(
        report,
        &format!("{at}/entrypoints"),
        app.entrypoints.len(),
        limits::ENTRYPOINTS,
    );
    let mut service_names = Vec::new();
    for (i, entrypoint) in app.entrypoints.iter().enumerate() {
        let ep = format!("{at}/entrypoints/{i}");
        check_argv(report, &format!("{ep}/command"), entrypoint.command());
        if let Some(cwd) = entrypoint.cwd() {
            check_guest_path(report, &format!("{ep}/cwd"), cwd);
        }
        if let Entrypoint::Service {
            name, max_restarts, ..
        } = entrypoint
        {
            if !is_service_name(name) || service_names.contains(&name) {
                report.error(
                    "IR022",
                    format!("{ep}/name"),
                    format!("{name:?} cannot name a service: 1-32 of a-z 0-9 _ -, once per app"),
                );
            }
            service_names.push(name);
            if max_restarts.is_some_and(|n| n > 1000) {
                report.error(
                    "IR022",
                    format!("{ep}/max_restarts"),
                    "max_restarts must be 0 to 1000",
                );
            }
        }
    }

    check_count(report, &format!("{at}/env"), app.env.len(), limits::ENV);
    for (name, value) in &app.env {
        check_env(
            report,
            &format!("{at}/env/{}", pointer_token(name)),
            name,
            value,
        );
    }

    check_network(report, &format!("{at}/network"), app);

    check_count(
        report,
        &format!("{at}/mounts"),
        app.mounts.len(),
        limits::LIST,
    );
    let declared: BTreeSet<&str> = workload.volumes.iter().map(|v| v.name.as_str()).collect();
    let mut targets = BTreeSet::new();
    for (i, mount) in app.mounts.iter().enumerate() {
        let m = format!("{at}/mounts/{i}");
        if !declared.contains(mount.volume.as_str()) {
            report.error(
                "IR017",
                format!("{m}/volume"),
                format!(
                    "mount names volume {:?}, which the workload does not declare",
                    mount.volume
                ),
            );
        }
        check_guest_path(report, &format!("{m}/target"), &mount.target);
        if !targets.insert(mount.target.as_str()) {
            report.error(
                "IR017",
                format!("{m}/target"),
                format!("two mounts target {:?}", mount.target),
            );
        }
    }

    let mut paths = BTreeSet::new();
    check_count(
        report,
        &format!("{at}/files"),
        app.files.len(),
        limits::LIST,
    );
    for (i, file) in app.files.iter().enumerate() {
        let f = format!("{at}/files/{i}");
        check_guest_path(report, &format!("{f}/path"), &file.path);
        if !paths.insert(file.path.as_str()) {
            report.error(
                "IR018",
                format!("{f}/path"),
                format!("file {:?} is declared twice", file.path),
            );
        }
        if file.content.len() > limits::FILE_CONTENT {
            report.error(
                "IR018",
                format!("{f}/content"),
                format!(
                    "file content is {} bytes, over the {}-byte limit; put large files in the image",
                    file.content.len(),
                    limits::FILE_CONTENT
                ),
            );
        }
        if let Some(mode) = &file.mode {
            let valid =
                (3..=4).contains(&mode.len()) && mode.bytes().all(|b| (b'0'..=b'7').contains(&b));
            if !valid {
                report.error(
                    "IR018",
                    format!("{f}/mode"),
                    format!("mode {mode:?} is not 3 or 4 octal digits such as \"0644\""),
                );
            }
        }
    }

    if let Some(hc) = &app.health_check {
        let h = format!("{at}/health_check");
        let probes = [
            hc.command.is_some(),
            hc.tcp_port.is_some(),
            hc.http.is_some(),
        ];
        if probes.iter().filter(|&&given| given).count() != 1 {
            report.error(
                "IR019",
                h.clone(),
                "give exactly one of command, tcp_port and http",
            );
        }
        if let Some(command) = &hc.command {
            check_argv(report, &format!("{h}/command"), command);
        }
        if hc.tcp_port == Some(0) || hc.http.as_ref().is_some_and(|http| http.port == 0) {
            report.error("IR019", h.clone(), "a probe's port must be 1 to 65535");
        }
        if let Some(http) = hc.http.as_ref().filter(|http| !is_http_path(&http.path)) {
            report.error(
                "IR019",
                format!("{h}/http/path"),
                format!(
                    "{:?} is not an HTTP path: / and printable ASCII without spaces",
                    http.path
                ),
            );
        }
        if hc.start_period_s > 3600 {
            report.error(
                "IR019",
                format!("{h}/start_period_s"),
                "start_period_s must be 0 to 3600",
            );
        }
        if service_names.is_empty() && !app.entrypoints.is_empty() {
            report.warning(
                "IR103",
                h.clone(),
                "a health check is probed only for an app with a service entrypoint: this one is not",
            );
        }
        if !(1..=3600).contains(&hc.interval_s) {
            report.error(
                "IR019",
                format!("{h}/interval_s"),
                "interval_s must be 1 to 3600",
            );
        }
        if hc.timeout_s == 0 || hc.timeout_s > hc.interval_s {
            report.error(
                "IR019",
                format!("{h}/timeout_s"),
                "timeout_s must be 1 to interval_s",
            );
        }
        if !(1..=100).contains(&hc.retries) {
            report.error("IR019", format!("{h}/retries"), "retries must be 1 to 100");
        }
    }
}

fn check_source(report: &mut Report, at: &str, source: &Source) {
    match source {
        Source::Path { path } => {
            let escapes = path.split('/').any(|c| c == "..");
            if path.is_empty() || path.starts_with('/') || escapes || path.contains('\0') {
                report.error(
                    "IR020",
                    format!("{at}/path"),
                    format!(
                        "source path {path:?} must be relative to the declaration, without '..'"
                    ),
                );
            }
        }
        Source::Git { url, rev } => {
            if !(url.starts_with("https://") || url.starts_with("ssh://")) {
                report.error(
                    "IR020",
                    format!("{at}/url"),
                    "git url must be https:// or ssh://",
                );
            }
            let full_commit = rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit());
            if !full_commit {
                report.error(
                    "IR020",
                    format!("{at}/rev"),
                    format!(
                        "git rev {rev:?} must be a full 40-hex-digit commit, not a branch or tag"
                    ),
                );
            }
        }
    }
}

fn check_image(report: &mut Report, at: &str, image: &Image) {
    match image {
        Image::OciBase { reference, digest } => {
            if !is_prefixed_sha256(digest) {
                report.error(
                    "IR006",
                    format!("{at}/digest"),
                    format!("digest {digest:?} is not sha256: followed by 64 lowercase hex digits"),
                );
            }
            if let Some(problem) = oci_reference_problem(reference, digest) {
                report.error("IR005", format!("{at}/reference"), problem);
            }
        }
        Image::NixPackages { packages } => {
            if packages.is_empty() {
                report.error(
                    "IR016",
                    format!("{at}/packages"),
                    "list at least one Nix package",
                );
            }
            check_count(
                report,
                &format!("{at}/packages"),
                packages.len(),
                limits::LIST,
            );
            for (i, attr) in packages.iter().enumerate() {
                if !is_nix_attr_path(attr) {
                    report.error(
                        "IR016",
                        format!("{at}/packages/{i}"),
                        format!(
                            "{attr:?} is not a Nix attribute path such as python3Packages.requests"
                        ),
                    );
                }
            }
        }
    }
}

/// Why `reference` is not a repository name that the pinned `digest` can complete, if it is not.
fn oci_reference_problem(reference: &str, digest: &str) -> Option<String> {
    // Local image layouts, named like skopeo's transports: a path, pinned by `digest`.
    for transport in ["oci:", "oci-archive:"] {
        if let Some(path) = reference.strip_prefix(transport) {
            if path.is_empty() || path.contains('\0') {
                return Some(format!(
                    "{transport} needs a path, such as {transport}./image"
                ));
            }
            return None;
        }
    }
    let (name, pinned) = match reference.split_once('@') {
        Some((name, pinned)) => (name, Some(pinned)),
        None => (reference, None),
    };
    if let Some(pinned) = pinned {
        if pinned != digest {
            return Some(format!(
                "reference is pinned to {pinned}, which differs from digest {digest}"
            ));
        }
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        return Some(format!(
            "{reference:?} names a tag; name the repository only and pin the image with `digest`"
        ));
    }
    let valid_chars = name.bytes().all(|b| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'.' | b'_' | b'-' | b'/' | b':')
    });
    if name.is_empty()
        || !valid_chars
        || name.starts_with('/')
        || name.ends_with('/')
        || name.contains("//")
    {
        return Some(format!(
            "{reference:?} is not an OCI repository name such as 127.0.0.1:5000/busybox"
        ));
    }
    let host = name.split('/').next().unwrap_or_default();
    let names_a_host =
        name.contains('/') && (host.contains('.') || host.contains(':') || host == "localhost");
    if !names_a_host {
        return Some(format!(
            "{reference:?} does not name its registry: write HOST[:PORT]/REPOSITORY, e.g. docker.io/library/busybox"
        ));
    }
    None
}

fn is_nix_attr_path(attr: &str) -> bool {
    !attr.is_empty()
        && attr.len() <= 256
        && attr.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '\''))
        })
}

fn check_env(report: &mut Report, at: &str, name: &str, value: &EnvValue) {
    let valid_name = is_env_name(name);
    if !valid_name {
        report.error(
            "IR011",
            at,
            format!("{name:?} is not a valid environment variable name"),
        );
        return;
    }
    if crate::env::is_denied(name) {
        report.error(
            "IR012",
            at,
            format!("{name} changes how the loader, a shell or an interpreter behaves, or opens a credential session, and is never passed"),
        );
    }
    match value {
        EnvValue::Literal { value } => {
            if value.len() > limits::STRING || value.contains('\0') {
                report.error(
                    "IR011",
                    format!("{at}/value"),
                    "value is over 64 KiB or contains NUL",
                );
            }
            let upper = name.to_ascii_uppercase();
            let secret_name =
                SECRET_NAME_WORDS.iter().any(|w| upper.contains(w)) || upper.ends_with("_KEY");
            let secret_value = SECRET_VALUE_PREFIXES.iter().any(|p| value.starts_with(p));
            if (secret_name && !value.is_empty()) || secret_value {
                report.error(
                    "IR010",
                    format!("{at}/value"),
                    format!(
                        "{name} looks like a credential: write it as {{\"kind\": \"secret_ref\", \"name\": \"...\"}} so its value stays on the host"
                    ),
                );
            }
        }
        EnvValue::SecretRef { name: secret, .. } => {
            if !is_identifier(secret) {
                report.error(
                    "IR013",
                    format!("{at}/name"),
                    format!("secret name {secret:?} must be 1-63 of [a-z0-9._-], starting with a letter or digit"),
                );
            }
        }
    }
}

fn check_network(report: &mut Report, at: &str, app: &App) {
    let network = &app.network;
    if network.mode == NetworkMode::None && !network.egress.allowlist.is_empty() {
        report.warning(
            "IR101",
            format!("{at}/egress/allowlist"),
            "network mode is \"none\": the egress allowlist has no effect until mode is \"allowlist\"",
        );
    }
    check_count(
        report,
        &format!("{at}/egress/allowlist"),
        network.egress.allowlist.len(),
        limits::LIST,
    );
    for (i, grant) in network.egress.allowlist.iter().enumerate() {
        let g = format!("{at}/egress/allowlist/{i}");
        if !is_egress_host(&grant.host) {
            report.error(
                "IR014",
                format!("{g}/host"),
                format!("{:?} is not a DNS name, *.suffix or IP address", grant.host),
            );
        }
        if grant.port == 0 {
            report.error("IR014", format!("{g}/port"), "port must be 1 to 65535");
        }
    }
    check_count(
        report,
        &format!("{at}/ports"),
        network.ports.len(),
        limits::LIST,
    );
    let mut guest_ports = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (i, port) in network.ports.iter().enumerate() {
        let p = format!("{at}/ports/{i}");
        if port.guest == 0 || port.host == Some(0) {
            report.error("IR015", &p, "ports must be 1 to 65535");
        }
        if !guest_ports.insert(port.guest) {
            report.error(
                "IR015",
                format!("{p}/guest"),
                format!("guest port {} is forwarded twice", port.guest),
            );
        }
        if let Some(host) = port.host {
            if !host_ports.insert(host) {
                report.error(
                    "IR015",
                    format!("{p}/host"),
                    format!("host port {host} is used twice"),
                );
            }
        }
    }
}

/// A DNS name, a `*.`-prefixed DNS suffix, or an IP address.
pub fn is_egress_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn check_argv(report: &mut Report, at: &str, argv: &[String]) {
    if argv.is_empty() || argv[0].is_empty() {
        report.error(
            "IR007",
            at,
            "the command is empty; give at least the program to run",
        );
    }
    check_count(report, at, argv.len(), limits::ARGV);
    for (i, arg) in argv.iter().enumerate() {
        if arg.contains('\0') || arg.len() > limits::STRING {
            report.error(
                "IR007",
                format!("{at}/{i}"),
                "argument contains NUL or is over 64 KiB",
            );
        }
    }
}

fn check_guest_path(report: &mut Report, at: &str, path: &str) {
    if !is_guest_path(path) {
        report.error(
            "IR009",
            at,
            format!(
                "{path:?} must be an absolute guest path without '.', '..' or empty components"
            ),
        );
    }
}

/// An absolute guest path without `.`, `..` or empty components, NUL, or excess length.
pub fn is_guest_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= limits::PATH
        && !path.contains('\0')
        && path.split('/').skip(1).all(|c| c != "." && c != "..")
        && (path == "/" || !path.contains("//"))
}

fn check_identifier(report: &mut Report, at: &str, what: &str, value: &str) {
    if !is_identifier(value) {
        report.error(
            "IR002",
            at,
            format!(
                "{what} {value:?} must be 1-63 of [a-z0-9._-], starting with a letter or digit"
            ),
        );
    }
}

fn check_count(report: &mut Report, at: &str, count: usize, limit: usize) {
    if count > limit {
        report.error(
            "IR021",
            at,
            format!("{count} entries, over the limit of {limit}"),
        );
    }
}

/// A portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 256 bytes.
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Names of workloads, apps, volumes and secrets: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn is_identifier(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Escapes one reference token of an RFC 6901 JSON pointer.
fn pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}
