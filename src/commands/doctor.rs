//! `mvm doctor`: what this host can run and what is missing, one row per check, each with
//! `ok`, `warn` or `fail`, a one-line finding, and the command that fixes it where one does.
//! Nothing is created or changed: the checks only read. Exit status 1 when a row fails.

use std::fs::{self, File};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use mvm_builder::builder_image::BuilderImage;
use mvm_builder::kernel::KernelStore;
use mvm_ir::keys::DEFAULT_KEY;
use mvm_ir::{Coded, Error};
use mvm_runner::backend::select::{self, BackendChoice, HostError, HostFacts, Selected, VirtKind};
use serde::Serialize;
use serde_json::{json, Value};

use super::{CodedError, Host};
use crate::output::Output;

/// The command that builds the static guest agent.
const AGENT_BUILD: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p mvm-agent --release --target x86_64-unknown-linux-gnu";
/// How long a registry has to accept a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Registries in `config.toml` are the plain-HTTP ones: without a port, HTTP's.
const REGISTRY_DEFAULT_PORT: u16 = 80;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One row of the report.
#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    finding: String,
    /// The shell command that fixes a `warn` or `fail`, when one command can.
    fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, finding: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            finding: finding.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, finding: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            finding: finding.into(),
            fix,
        }
    }

    fn fail(name: &'static str, finding: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            finding: finding.into(),
            fix,
        }
    }
}

/// Runs every check and reports them; the exit status is 1 when one failed.
pub fn run(out: &Output) -> ExitCode {
    let facts = HostFacts::detect();
    let auto = select::select(BackendChoice::Auto, &facts);
    let mut checks = vec![virtualization(&facts, &auto), qemu(&facts)];
    match Host::open() {
        Ok(host) => {
            checks.push(guest_kernel(&host));
            checks.push(guest_agent());
            checks.push(builder_image(&host));
            checks.push(state_dir(&host));
            checks.push(signing_key(&host));
            checks.extend(registries(&host));
        }
        Err(e) => {
            checks.push(guest_agent());
            checks.push(Check::fail(
                "state-dir",
                format!("{e}: the kernel, key and registry checks need it"),
                Some("export MVM_HOME=\"$HOME/.mvm\"".into()),
            ));
        }
    }
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    let doc = json!({
        "ok": !failed,
        "checks": checks,
        "backend": backend_json(&facts, &auto),
    });
    out.result(doc, || table(&checks));
    ExitCode::from(u8::from(failed))
}

/// What `auto` picks on this host, for programs.
fn backend_json(facts: &HostFacts, auto: &Result<Selected, HostError>) -> Value {
    let mut doc = json!({
        "choice": BackendChoice::Auto.to_string(),
        "virtualization": facts.virt.name(),
        "qemu": facts.qemu.as_ref().ok().map(|q| json!({
            "path": q.path,
            "version": q.version.to_string(),
        })),
    });
    match auto {
        Ok(selected) => {
            doc["backend"] = json!(selected.backend.to_string());
            doc["accel"] = json!(selected.accel.to_string());
            doc["reason"] = json!(selected.reason);
        }
        Err(e) => doc["error"] = json!({"code": e.code(), "message": e.to_string()}),
    }
    doc
}

/// The report for people: an aligned table, each fix under its row.
fn table(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut text = format!("{:<width$}  {:<6}  FINDING", "CHECK", "STATUS");
    for check in checks {
        text.push_str(&format!(
            "\n{:<width$}  {:<6}  {}",
            check.name,
            check.status.as_str(),
            check.finding
        ));
        if let Some(fix) = &check.fix {
            text.push_str(&format!("\n{:<width$}  {:<6}  fix: {fix}", "", ""));
        }
    }
    let count = |status| checks.iter().filter(|c| c.status == status).count();
    let (failed, warned) = (count(Status::Fail), count(Status::Warn));
    text.push_str(&format!(
        "\n\n{} of {} checks ok, {warned} warning{}, {failed} failed",
        count(Status::Ok),
        checks.len(),
        if warned == 1 { "" } else { "s" },
    ));
    text
}

/// The host's virtualization and the backend `auto` picks on it.
fn virtualization(facts: &HostFacts, auto: &Result<Selected, HostError>) -> Check {
    let finding = match auto {
        Ok(selected) => format!(
            "{} (auto: {}, accel {})",
            selected.reason, selected.backend, selected.accel
        ),
        Err(e) => format!("{}; auto finds no backend ({})", facts.virt, e.code()),
    };
    match &facts.virt {
        VirtKind::Unusable { reason } => match reason.fix() {
            Some(fix) => Check::warn("virtualization", finding, Some(fix)),
            None => Check::ok("virtualization", finding),
        },
        _ => Check::ok("virtualization", finding),
    }
}

fn qemu(facts: &HostFacts) -> Check {
    match &facts.qemu {
        Ok(qemu) => Check::ok(
            "qemu",
            format!(
                "QEMU {} at {} (mvm needs {} or newer)",
                qemu.version,
                qemu.path.display(),
                select::MIN_QEMU
            ),
        ),
        Err(e) => Check::fail(
            "qemu",
            format!("{}: {e}", e.code()),
            e.fix().map(str::to_string),
        ),
    }
}

/// The newest stored kernel, every file re-hashed against its pin.
fn guest_kernel(host: &Host) -> Check {
    const NAME: &str = "guest-kernel";
    match KernelStore::at(&host.home.root().join("kernels")).latest() {
        Ok(kernel) => {
            let m = &kernel.manifest;
            let files = 1 + usize::from(m.vmlinux.is_some()) + m.modules.len();
            Check::ok(
                NAME,
                format!(
                    "{} ({} {}), vmlinuz {}, {files} files match their pins",
                    m.release,
                    m.package.name,
                    m.package.version,
                    short_digest(&m.vmlinuz.digest)
                ),
            )
        }
        Err(e) => Check::fail(
            NAME,
            format!("{}: {e}", e.code()),
            Some("mvm kernel fetch".into()),
        ),
    }
}

/// The builder VM's image, checked against its pin, and its plan, verified and valid a while
/// longer. None is fine: nothing builds in the builder VM yet.
fn builder_image(host: &Host) -> Check {
    const NAME: &str = "builder-image";
    let fix = Some("mvm builder fetch".to_string());
    let dir = host.home.root().join("builder");
    if !dir.join("image").exists() {
        return Check::ok(NAME, "none fetched (`mvm builder fetch` makes one)");
    }
    let image = match BuilderImage::open(&dir.join("image")) {
        Ok(image) => image,
        Err(e) => return Check::fail(NAME, format!("{}: {e}", e.code()), fix),
    };
    let m = &image.manifest;
    if !super::bundle::still_valid(host, &dir.join("bundle/plan.dsse.json")) {
        return Check::fail(
            NAME,
            "its plan is missing, does not verify, or expires within ten minutes",
            fix,
        );
    }
    Check::ok(
        NAME,
        format!(
            "image {}, {} packages pinned, worker {}, plan verified",
            short_digest(&m.image_digest),
            m.packages.len(),
            short_digest(&m.worker_sha256)
        ),
    )
}

/// `sha256:` and the first 12 hex digits.
fn short_digest(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}

/// The static guest agent `mvm build` puts in the initramfs: `$MVM_AGENT`, else `mvm-agent`
/// next to `mvm` (where `mvm build` looks).
fn guest_agent() -> Check {
    const NAME: &str = "guest-agent";
    let fix = || Some(AGENT_BUILD.to_string());
    let place = |path: &Path| {
        format!(
            "{}; build it, then copy it next to mvm or set MVM_AGENT",
            path.display()
        )
    };
    let path = match std::env::var_os("MVM_AGENT").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => match std::env::current_exe() {
            Ok(exe) => exe.with_file_name("mvm-agent"),
            Err(e) => {
                return Check::warn(
                    NAME,
                    format!("where mvm runs from is unknown ({e}); set MVM_AGENT"),
                    fix(),
                )
            }
        },
    };
    if !path.is_file() {
        return Check::warn(NAME, format!("no mvm-agent at {}", place(&path)), fix());
    }
    match static_x86_64(&path) {
        Ok(true) => Check::ok(
            NAME,
            format!("static x86-64 mvm-agent at {}", path.display()),
        ),
        Ok(false) => Check::warn(
            NAME,
            format!(
                "mvm-agent is dynamically linked and cannot be the guest's /init: {}",
                place(&path)
            ),
            fix(),
        ),
        Err(reason) => Check::warn(NAME, format!("{reason}: {}", place(&path)), fix()),
    }
}

/// Whether the file at `path` is an x86-64 ELF executable without a program interpreter
/// (`PT_INTERP`), i.e. statically linked; `Err` says why it is no such ELF file.
fn static_x86_64(path: &Path) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let file = File::open(path).map_err(|e| format!("cannot be read ({e})"))?;
    let mut header = [0u8; 64];
    file.read_exact_at(&mut header, 0)
        .map_err(|_| "not an ELF executable (too short)".to_string())?;
    if header[..4] != *b"\x7fELF" {
        return Err("not an ELF executable".into());
    }
    if header[4] != 2 || header[5] != 1 {
        return Err("not a 64-bit little-endian ELF executable".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    if u16_at(0x12) != EM_X86_64 {
        return Err(format!(
            "built for ELF machine {}, not x86-64",
            u16_at(0x12)
        ));
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&header[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff);
    let (entry_size, count) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    if count == 0 {
        return Ok(true);
    }
    if entry_size < 4 || entry_size * count > 1 << 20 {
        return Err("an ELF file with an implausible program header table".into());
    }
    let mut table = vec![0u8; entry_size * count];
    file.read_exact_at(&mut table, phoff)
        .map_err(|_| "an ELF file whose program headers lie past its end".to_string())?;
    let has_interpreter = table
        .chunks_exact(entry_size)
        .any(|entry| entry[..4] == PT_INTERP.to_le_bytes());
    Ok(!has_interpreter)
}

/// `$MVM_HOME` and its keys directory: owned by this user, not writable by others (keys: 0700).
/// A home that does not exist yet is fine: mvm creates it private on first use.
fn state_dir(host: &Host) -> Check {
    const NAME: &str = "state-dir";
    let root = host.home.root();
    let meta = match fs::metadata(root) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Check::ok(
                NAME,
                format!(
                    "{} does not exist yet; mvm creates it (mode 0700) on first use",
                    root.display()
                ),
            )
        }
        Err(e) => return Check::fail(NAME, format!("{}: {e}", root.display()), None),
    };
    if !meta.is_dir() {
        return Check::fail(NAME, format!("{} is not a directory", root.display()), None);
    }
    let mut problems = private_dir_problems(root, &meta, 0o022);
    let keys = root.join("keys");
    match fs::metadata(&keys) {
        Ok(meta) => problems.extend(private_dir_problems(&keys, &meta, 0o077)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => problems.push((format!("{}: {e}", keys.display()), None)),
    }
    if problems.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "{}: owned by this user, mode {:04o}",
                root.display(),
                meta.permissions().mode() & 0o7777
            ),
        );
    }
    let findings: Vec<String> = problems.iter().map(|(f, _)| f.clone()).collect();
    let fixes: Vec<String> = problems.into_iter().filter_map(|(_, fix)| fix).collect();
    Check::fail(
        NAME,
        findings.join("; "),
        (!fixes.is_empty()).then(|| fixes.join(" && ")),
    )
}

/// What is wrong with a directory that must belong to this user and grant none of the
/// `forbidden` mode bits, each with its fix.
fn private_dir_problems(
    dir: &Path,
    meta: &fs::Metadata,
    forbidden: u32,
) -> Vec<(String, Option<String>)> {
    let mut problems = Vec::new();
    // `/proc/self` is owned by this process's effective uid (as `MvmHome` checks it).
    let me = fs::metadata("/proc/self").map_or(meta.uid(), |m| m.uid());
    if meta.uid() != me {
        problems.push((
            format!(
                "{} is owned by uid {}, not by this user ({me})",
                dir.display(),
                meta.uid()
            ),
            Some(format!("sudo chown {me} {}", shell_quote(dir))),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & forbidden != 0 {
        let who = if forbidden == 0o022 {
            "lets group or others write there"
        } else {
            "must be 0700"
        };
        problems.push((
            format!("{} has mode {mode:04o}: {who}", dir.display()),
            Some(format!("chmod 700 {}", shell_quote(dir))),
        ));
    }
    problems
}

/// `path` as one shell word.
fn shell_quote(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The host's signing key, loaded as `mvm build` loads it (permissions and format checked).
fn signing_key(host: &Host) -> Check {
    const NAME: &str = "signing-key";
    let key_file = host
        .home
        .root()
        .join("keys")
        .join(format!("{DEFAULT_KEY}.key"));
    if fs::symlink_metadata(&key_file).is_err() {
        return Check::warn(
            NAME,
            format!(
                "no signing key {DEFAULT_KEY:?} ({}); `mvm build` creates one on first use",
                key_file.display()
            ),
            Some("mvm keys generate".into()),
        );
    }
    match host.keys.signer(DEFAULT_KEY) {
        Ok(signer) => Check::ok(NAME, format!("key {DEFAULT_KEY:?}: {}", signer.keyid())),
        Err(e) => {
            let fix = match &e {
                Error::KeyPermissions { path, .. } => {
                    Some(format!("chmod 600 {}", shell_quote(path)))
                }
                Error::BadKeyFile { path, .. } => Some(format!(
                    "mv {0} {0}.bad && mvm keys generate",
                    shell_quote(path)
                )),
                Error::UnsafeHome { path, .. } => Some(format!("chmod 700 {}", shell_quote(path))),
                _ => None,
            };
            Check::fail(NAME, format!("{}: {e}", e.code()), fix)
        }
    }
}

/// A TCP connect to each registry `config.toml` names; no HTTP, nothing public by default.
fn registries(host: &Host) -> Vec<Check> {
    const NAME: &str = "registry";
    let config = host.home.root().join("config.toml");
    let names = match super::build::insecure_registries(host) {
        Ok(names) => names,
        Err(e) => {
            let code = e
                .downcast_ref::<CodedError>()
                .map_or("INTERNAL", |c| c.code.as_str());
            return vec![Check::fail(NAME, format!("{code}: {e:#}"), None)];
        }
    };
    if names.is_empty() {
        return vec![Check::ok(
            NAME,
            format!("none configured in {}", config.display()),
        )];
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1);
    let pending: Vec<(String, mpsc::Receiver<Result<Duration, String>>)> = names
        .into_iter()
        .map(|name| {
            let (tx, rx) = mpsc::channel();
            let target = name.clone();
            // A thread each: name resolution has no timeout of its own.
            thread::spawn(move || {
                let _ = tx.send(connect(&target));
            });
            (name, rx)
        })
        .collect();
    pending
        .into_iter()
        .map(|(name, rx)| {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(took)) => Check::ok(
                    NAME,
                    format!("{name}: accepts TCP connections ({} ms)", took.as_millis()),
                ),
                Ok(Err(reason)) => Check::warn(NAME, format!("{name}: {reason}"), None),
                Err(_) => Check::warn(
                    NAME,
                    format!("{name}: no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                    None,
                ),
            }
        })
        .collect()
}

/// Connects to `registry` (`host[:port]`, `[v6]:port`) and says how long it took.
fn connect(registry: &str) -> Result<Duration, String> {
    let (host, port) = split_host_port(registry)?;
    let started = Instant::now();
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = format!("{host} resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(started.elapsed()),
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// The host and port of `host[:port]` or `[v6]:port`; the port defaults to HTTP's.
fn split_host_port(registry: &str) -> Result<(&str, u16), String> {
    let (host, port) = match registry.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{registry:?} lacks the closing ]"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| format!("{registry:?} has text after the ]"))?,
                ),
            };
            (host, port)
        }
        None => match registry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        },
    };
    if host.is_empty() {
        return Err(format!("{registry:?} names no host"));
    }
    let port = match port {
        Some(port) => port
            .parse()
            .map_err(|_| format!("{registry:?} has no valid port"))?,
        None => REGISTRY_DEFAULT_PORT,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16, program_types: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&(program_types.len() as u16).to_le_bytes());
        for p_type in program_types {
            let mut entry = vec![0u8; 56];
            entry[..4].copy_from_slice(&p_type.to_le_bytes());
            bytes.extend(entry);
        }
        bytes
    }

    #[test]
    fn tells_static_from_dynamic_executables() {
        let tmp = tempfile::tempdir().unwrap();
        let check = |bytes: &[u8]| {
            let path = tmp.path().join("f");
            fs::write(&path, bytes).unwrap();
            static_x86_64(&path)
        };
        assert_eq!(check(&elf(62, &[])), Ok(true));
        assert_eq!(check(&elf(62, &[1, 1, 4])), Ok(true));
        assert_eq!(check(&elf(62, &[6, 3, 1])), Ok(false));
        assert!(check(&elf(183, &[1])).unwrap_err().contains("machine 183"));
        assert!(check(b"#!/bin/sh\n").is_err());
        assert!(check(b"\x7fELF").is_err());
        let mut truncated = elf(62, &[1, 3]);
        truncated.truncate(100);
        assert!(check(&truncated).is_err());
        let mut huge = elf(62, &[]);
        huge[0x36..0x3a].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(check(&huge).is_err());
    }

    #[test]
    fn splits_registry_names() {
        assert_eq!(split_host_port("127.0.0.1:5000"), Ok(("127.0.0.1", 5000)));
        assert_eq!(
            split_host_port("registry.internal"),
            Ok(("registry.internal", 80))
        );
        assert_eq!(split_host_port("[::1]:5000"), Ok(("::1", 5000)));
        assert_eq!(split_host_port("[::1]"), Ok(("::1", 80)));
        for bad in [
            "",
            ":5000",
            "host:",
            "host:http",
            "[::1",
            "[]:1",
            "[::1]5000",
            "host:99999",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quotes_paths_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/tmp/a-b_c.d")), "/tmp/a-b_c.d");
        assert_eq!(shell_quote(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(shell_quote(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }
}
