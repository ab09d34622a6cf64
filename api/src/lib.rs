//! `mvm serve`: the local API the SDKs drive. HTTP/1.1 and JSON on a Unix socket,
//! `$MVM_HOME/api.sock`, readable by its owner only and serving only the user who runs it
//! (each connection's peer credentials are checked). Versioned under `/v1`; the routes and
//! their documents are in [`openapi::document`].
//!
//! The server is a client of the runner library like the CLI: a sandbox is a named VM
//! ([`mvm_runner::named_vm::NamedVm`]), served by its own runner, and outlives the server. One
//! server per mvm home (a lock says which); SDKs start it on demand, and it ends once idle.

mod body;
mod commands;
pub mod error;
pub mod files;
pub mod model;
pub mod openapi;
mod routes;
pub mod sandboxes;
mod server;

pub use server::{serve, ServeOptions, Served};

use std::process::Command;

use error::ApiError;
use model::CreateSandbox;

/// `seconds` since the epoch as RFC 3339, as the API's documents show times.
fn rfc3339(seconds: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// How sandboxes come to run: the CLI's way of turning an image into a signed bundle and
/// of starting runners, which the server uses without knowing how images are built.
pub trait Launcher: Send + Sync + 'static {
    /// An `mvm-runner` command that boots `spec` as the VM `id` (its image built into a
    /// signed bundle first, when it is one). Blocking: a build may take minutes.
    fn runner_for(&self, id: &str, spec: &CreateSandbox) -> Result<Command, ApiError>;

    /// An `mvm-runner` command that wakes the cold VM `id`.
    fn waker(&self, id: &str) -> Result<Command, ApiError>;
}
