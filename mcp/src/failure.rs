//! Why a tool call failed: a stable code, a class an agent can act on, and a message. An MCP
//! client gets it as a tool result with `isError` (never as a protocol error); `mvm tool run`
//! as its response's `error`.

#[cfg(feature = "server")]
use mvm_api::error::ApiError;
#[cfg(feature = "server")]
use mvm_runner::named_vm::NamedVmError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What kind of failure it was, so that an agent knows whether to retry, fix its request or
/// give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The server's policy refused it: an image not allowed, too many sandboxes, a path the
    /// agent refuses.
    Policy,
    /// The request is malformed or out of bounds, or names no sandbox of this server.
    Validation,
    /// It ran past its time.
    Timeout,
    /// The sandbox could not be built or booted, could not run the command (no such
    /// program), or went away while it ran.
    Guest,
    /// The channel to the sandbox or the host failed.
    Transport,
    /// It ran, but what it left could not be removed or kept as asked.
    Cleanup,
}

impl FailureClass {
    /// Its name, as it is serialized.
    pub fn name(self) -> &'static str {
        match self {
            FailureClass::Policy => "policy",
            FailureClass::Validation => "validation",
            FailureClass::Timeout => "timeout",
            FailureClass::Guest => "guest",
            FailureClass::Transport => "transport",
            FailureClass::Cleanup => "cleanup",
        }
    }
}

/// A failed call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{code} {}: {message}", class.name())]
pub struct ToolFailure {
    /// Its class.
    pub class: FailureClass,
    /// The stable code (`MCP001`, or the code of the layer that refused: `AGENT…`, `RUN…`,
    /// `BUILD…`).
    pub code: String,
    /// What happened, for a person.
    pub message: String,
}

/// This crate's own codes (`docs/mcp.md`); the server's uses most of them.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub mod codes {
    /// Arguments out of bounds or malformed.
    pub const MCP001: &str = "MCP001";
    /// An image the server does not allow.
    pub const MCP002: &str = "MCP002";
    /// As many sandboxes as the server allows exist already.
    pub const MCP003: &str = "MCP003";
    /// No sandbox of this server has this id.
    pub const MCP004: &str = "MCP004";
    /// The call ran past its time.
    pub const MCP005: &str = "MCP005";
    /// A sandbox could not be removed, stopped or saved after the call.
    pub const MCP006: &str = "MCP006";
    /// The host failed (a thread, the audit chain).
    pub const MCP007: &str = "MCP007";
}

impl ToolFailure {
    /// A failure of `class` with `code`.
    pub fn new(class: FailureClass, code: &str, message: impl Into<String>) -> Self {
        Self {
            class,
            code: code.into(),
            message: message.into(),
        }
    }

    /// Arguments out of bounds or malformed (MCP001).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Validation, codes::MCP001, message)
    }
}

#[cfg(feature = "server")]
impl From<ApiError> for ToolFailure {
    fn from(error: ApiError) -> Self {
        let class = match &error {
            ApiError::BadRequest(_)
            | ApiError::NoRoute(_)
            | ApiError::WrongMethod { .. }
            | ApiError::TooLarge(_)
            | ApiError::NotFound(_) => FailureClass::Validation,
            ApiError::Launch { .. } => FailureClass::Guest,
            ApiError::Vm(vm) => match vm {
                NamedVmError::Refused(refusal) => refusal_class(&refusal.code),
                NamedVmError::BadName(_)
                | NamedVmError::Exists(_)
                | NamedVmError::Live { .. }
                | NamedVmError::Unavailable(_) => FailureClass::Validation,
                NamedVmError::RunnerFailed { .. } => FailureClass::Guest,
                NamedVmError::Channel(_) | NamedVmError::Host { .. } => FailureClass::Transport,
            },
            ApiError::Host(_) => FailureClass::Transport,
        };
        Self {
            class,
            code: error.code(),
            message: error.to_string(),
        }
    }
}

/// The class of the agent's (or its runner's) refusal `code` (docs/errors.md): a rule that
/// refused, a request the agent could not take, a guest that could not do it, or a channel
/// that failed.
#[cfg(feature = "server")]
fn refusal_class(code: &str) -> FailureClass {
    match code {
        // A path outside /tmp or through a symlink, root asked for, a profile's refusal.
        "AGENT107" | "AGENT114" | "AGENT117" => FailureClass::Policy,
        // A malformed request, a missing working directory, no such process, file state.
        "AGENT100" | "AGENT106" | "AGENT110" | "AGENT112" => FailureClass::Validation,
        // Another protocol version, flow control broken.
        "AGENT105" | "AGENT111" => FailureClass::Transport,
        // No such program, not executable, not startable (or the VM is stopping), busy, a
        // file the guest could not read or write.
        _ => FailureClass::Guest,
    }
}

#[cfg(feature = "server")]
impl From<NamedVmError> for ToolFailure {
    fn from(error: NamedVmError) -> Self {
        ApiError::from(error).into()
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classed_by_their_code() {
        assert_eq!(refusal_class("AGENT107"), FailureClass::Policy);
        assert_eq!(refusal_class("AGENT117"), FailureClass::Policy);
        assert_eq!(refusal_class("AGENT112"), FailureClass::Validation);
        assert_eq!(refusal_class("AGENT101"), FailureClass::Guest);
        assert_eq!(refusal_class("AGENT103"), FailureClass::Guest);
        assert_eq!(refusal_class("AGENT111"), FailureClass::Transport);
        let refused = NamedVmError::Refused(mvm_protocol::ErrorReply {
            code: "AGENT107".into(),
            message: "outside /tmp".into(),
        });
        let failure = ToolFailure::from(refused);
        assert_eq!(
            (failure.class, failure.code.as_str()),
            (FailureClass::Policy, "AGENT107")
        );
    }
}
