//! mvm's sandboxes as tools for agents: `mvm mcp`, a Model Context Protocol server over stdio
//! on the official Rust SDK (`rmcp`), and `mvm tool run`, the agent tool contract (one JSON
//! request on stdin, one JSON response on stdout), which the MCP tool `sandbox_run_code` is
//! too.
//!
//! Both are clients of the runner library like the CLI and the local API: a sandbox is a named
//! VM ([`mvm_runner::named_vm::NamedVm`]) made and kept by [`mvm_api::sandboxes::Sandboxes`];
//! nothing here starts `mvm`. What a client may do is the server's to say ([`Limits`]): the
//! images it may start (digest-pinned, named by `--allow-image`), how many sandboxes at once,
//! the longest call, the largest input and output. A client sees and touches only the
//! sandboxes made through this crate (labelled [`MCP_LABEL`]), never the host's other VMs.
//!
//! The contract and the tools' types need none of that: with the default `server` feature off
//! (the fuzz targets' build) only they are built.
//!
//! Every call is audited on the host's signed chain (`mcp.call`: the tool's name and the
//! digest of its arguments, never their values); every command leaves a signed receipt,
//! whose digest the result gives as `audit_id`.

pub mod contract;
mod failure;
mod limits;
pub mod params;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod service;

pub use failure::{FailureClass, ToolFailure};
pub use limits::Limits;
#[cfg(feature = "server")]
pub use server::{run_stdio, serve_stdio, McpServer};
#[cfg(feature = "server")]
pub use service::Service;

/// The label every sandbox made here carries (`"true"`): the only sandboxes its tools see.
pub const MCP_LABEL: &str = "mvm.mcp";
