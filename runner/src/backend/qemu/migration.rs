//! Saving a stopped guest to a file and loading it back, with QEMU's migration stream over a
//! unix socket the runner holds: QEMU's sandbox denies it spawning (no `exec:` migration) and
//! QEMU 7.2 has no `file:` one, and this way the runner hashes every byte as it passes.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::qmp::Qmp;
use crate::backend::{copy_hashing, SavedMemory};

/// How long QEMU may take to connect, and to finish once the stream has passed.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the migration's status is asked for.
const POLL: Duration = Duration::from_millis(20);

/// Saves the (stopped) guest of the QEMU behind `qmp` into `into`, through a socket at
/// `socket`; returns the stream's digest and size.
pub fn save(qmp: &mut Qmp, socket: &Path, into: &mut File) -> io::Result<SavedMemory> {
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    let saved = (|| {
        // QEMU's default bandwidth cap is for live migration over a network: none here.
        qmp.execute_with(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1u64 << 40}),
        )?;
        qmp.execute_with("migrate", json!({"uri": unix_uri(socket)?}))?;
        let mut stream = accept_within(&listener, MIGRATION_TIMEOUT)?;
        let saved = copy_hashing(&mut stream, into)?;
        wait_until_completed(qmp)?;
        Ok(saved)
    })();
    let _ = fs::remove_file(socket);
    saved
}

/// Streams `memory` into the QEMU started with `-incoming unix:<socket>` (see
/// [`incoming_argument`]) through its QMP at `machine_socket` and waits until QEMU has loaded
/// the state; returns that connection and the digest of what was streamed, for the caller to
/// compare before it lets the guest run. QEMU leaves the guest stopped: it was stopped when
/// saved. `ignore_shared`: the state was saved without the RAM of a file-backed memory
/// backend ([`set_ignore_shared`]), which the loading QEMU maps instead; the capability is
/// turned off again once loaded, so that a later save of this VM carries its RAM.
pub fn load(
    socket: &Path,
    memory: &mut File,
    machine_socket: &Path,
    ignore_shared: bool,
) -> io::Result<(Qmp, SavedMemory)> {
    // QEMU makes its QMP socket first, and listens on `socket` later in its start.
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let mut qmp = loop {
        match Qmp::connect(machine_socket) {
            Ok(qmp) => break qmp,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(POLL),
        }
    };
    if ignore_shared {
        set_ignore_shared(&mut qmp, true)?;
    }
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(POLL),
        }
    };
    let streamed = copy_hashing(memory, &mut stream)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    wait_until_completed(&mut qmp)?;
    if ignore_shared {
        set_ignore_shared(&mut qmp, false)?;
    }
    Ok((qmp, streamed))
}

/// Sets QEMU's `x-ignore-shared` migration capability: a save leaves out the RAM of memory
/// backends that are shared files (the file holds it), and a load expects it left out.
pub fn set_ignore_shared(qmp: &mut Qmp, on: bool) -> io::Result<()> {
    qmp.execute_with(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]}),
    )
    .map(drop)
}

/// QEMU's `-incoming` value for a load through `socket`.
pub fn incoming_argument(socket: &Path) -> io::Result<String> {
    unix_uri(socket)
}

/// `unix:<path>`: QEMU takes the rest of the text as the path, so it must be UTF-8.
fn unix_uri(socket: &Path) -> io::Result<String> {
    socket
        .to_str()
        .map(|path| format!("unix:{path}"))
        .ok_or_else(|| io::Error::other(format!("{}: not UTF-8", socket.display())))
}

fn accept_within(listener: &UnixListener, timeout: Duration) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(POLL)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "QEMU did not connect its migration stream",
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until QEMU reports the migration `completed`; its `failed` (with QEMU's reason) or
/// a timeout is an error.
fn wait_until_completed(qmp: &mut Qmp) -> io::Result<()> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let status = qmp.execute_with("query-migrate", json!({}))?;
        match status["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => {
                let reason = status["error-desc"].as_str().unwrap_or("no reason given");
                return Err(io::Error::other(format!(
                    "QEMU's migration failed: {reason}"
                )));
            }
            _ if Instant::now() > deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("QEMU's migration is still {status}"),
                ))
            }
            _ => std::thread::sleep(POLL),
        }
    }
}
