//! The API's errors: each answer that is not a success carries a stable code (`docs/errors.md`)
//! and the HTTP status its kind calls for. Codes raised below the API — a named VM's (`RUN…`),
//! the agent's (`AGENT…`) — pass through unchanged, so an SDK user sees the code the CLI shows.

use http::StatusCode;
use mvm_runner::named_vm::NamedVmError;
use serde::Serialize;

/// The body of every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// One error: its stable code and what happened.
#[derive(Debug, Serialize, serde::Deserialize, schemars::JsonSchema, Clone, PartialEq)]
pub struct ErrorDetail {
    /// The stable code (`API001`, `RUN036`, `AGENT101`, …).
    pub code: String,
    /// What happened, for a person.
    pub message: String,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is not one the API takes: malformed JSON, an unknown field, a missing or
    /// bad parameter.
    #[error("{0}")]
    BadRequest(String),
    /// No route has this path.
    #[error("no such route: {0}")]
    NoRoute(String),
    /// The route exists but not with this method.
    #[error("{method} is not allowed on {path}")]
    WrongMethod {
        /// The method asked.
        method: String,
        /// The path.
        path: String,
    },
    /// The request's body is larger than the API takes for it.
    #[error("the request body is over {0} bytes")]
    TooLarge(u64),
    /// No sandbox, or no command, has this id.
    #[error("{0}")]
    NotFound(String),
    /// The sandbox cannot be built or started from what was given.
    #[error("{message}")]
    Launch {
        /// The code the build or the runner gave (or API007 when it gave none).
        code: String,
        /// What it said.
        message: String,
    },
    /// A named VM's error, or the agent's refusal, with its own code.
    #[error(transparent)]
    Vm(#[from] NamedVmError),
    /// The host failed (a file, a thread, the runtime).
    #[error("{0}")]
    Host(String),
}

/// The API's own codes.
pub mod codes {
    /// A malformed request: bad JSON, an unknown field, a bad parameter.
    pub const API001: &str = "API001";
    /// No such route.
    pub const API002: &str = "API002";
    /// A method the route does not take.
    pub const API003: &str = "API003";
    /// A request body over its limit.
    pub const API004: &str = "API004";
    /// No sandbox or command with this id.
    pub const API005: &str = "API005";
    /// The host failed while serving the request.
    pub const API006: &str = "API006";
    /// A sandbox could not be built or started, and what failed gave no code.
    pub const API007: &str = "API007";
    /// A template the host does not map to a digest-pinned image.
    pub const API008: &str = "API008";
}

impl ApiError {
    /// The stable code.
    pub fn code(&self) -> String {
        match self {
            ApiError::BadRequest(_) => codes::API001.into(),
            ApiError::NoRoute(_) => codes::API002.into(),
            ApiError::WrongMethod { .. } => codes::API003.into(),
            ApiError::TooLarge(_) => codes::API004.into(),
            ApiError::NotFound(_) => codes::API005.into(),
            ApiError::Launch { code, .. } => code.clone(),
            ApiError::Vm(error) => error.code().unwrap_or(codes::API006).into(),
            ApiError::Host(_) => codes::API006.into(),
        }
    }

    /// The HTTP status that goes with it.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NoRoute(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::WrongMethod { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Launch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Vm(error) => match error {
                NamedVmError::BadName(_) | NamedVmError::Refused(_) => StatusCode::BAD_REQUEST,
                NamedVmError::Exists(_) | NamedVmError::Live { .. } => StatusCode::CONFLICT,
                NamedVmError::Unavailable(message) if message.starts_with("there is no VM") => {
                    StatusCode::NOT_FOUND
                }
                NamedVmError::Unavailable(_) => StatusCode::CONFLICT,
                NamedVmError::Channel(_) => StatusCode::BAD_GATEWAY,
                NamedVmError::RunnerFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                NamedVmError::Host { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Host(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Its answer's body.
    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code(),
            message: self.to_string(),
        }
    }

    /// A failure of the host, from anything that says what it was.
    pub fn host(what: &str) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
        move |e| ApiError::Host(format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_vm_is_not_found_and_keeps_its_code() {
        let error = ApiError::from(NamedVmError::Unavailable("there is no VM named x".into()));
        assert_eq!(
            (error.code(), error.status()),
            ("RUN036".into(), StatusCode::NOT_FOUND)
        );
        let stopped = ApiError::from(NamedVmError::Unavailable("x is stopped".into()));
        assert_eq!(stopped.status(), StatusCode::CONFLICT);
        let refused = ApiError::from(NamedVmError::Refused(mvm_protocol::ErrorReply {
            code: "AGENT101".into(),
            message: "no such program".into(),
        }));
        assert_eq!(
            (refused.code(), refused.status()),
            ("AGENT101".into(), StatusCode::BAD_REQUEST)
        );
    }
}
