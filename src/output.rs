//! How results reach the user: text for people, one JSON document for programs, and the exit
//! status that goes with each error class.

use std::io::Write as _;
use std::process::ExitCode;

use mvm_ir::terminal::{printable, Newlines};
use mvm_ir::{Coded, Error, ErrorClass};
use serde_json::{json, Value};

/// Exit status of a refused verification or integrity check.
pub const EXIT_INTEGRITY: u8 = 1;
/// Exit status of an input that is not a valid document (`EX_DATAERR`).
pub const EXIT_INVALID_INPUT: u8 = 65;
/// Exit status of a file that could not be read or written (`EX_IOERR`).
pub const EXIT_IO: u8 = 74;
/// Exit status of an unexpected internal failure (`EX_SOFTWARE`).
pub const EXIT_INTERNAL: u8 = 70;

/// Where a command's results go.
pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// Prints a result: `value` as JSON with `--json`, else the text `human` builds.
    pub fn result(&self, value: Value, human: impl FnOnce() -> String) {
        let text = if self.json {
            serde_json::to_string_pretty(&value).unwrap_or_default()
        } else {
            // Results quote names and messages from guests: shown, never obeyed.
            printable(&human(), Newlines::Keep).into_owned()
        };
        if !text.is_empty() {
            // A reader that went away (`mvm … | head -1`) is not an error of the command's.
            let _ = writeln!(std::io::stdout().lock(), "{text}");
        }
    }

    /// Whether JSON was asked for.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Reports `err` and returns the exit status of its class.
    pub fn error(&self, err: &anyhow::Error) -> ExitCode {
        let class_status = |class| match class {
            ErrorClass::Integrity => EXIT_INTEGRITY,
            ErrorClass::InvalidInput => EXIT_INVALID_INPUT,
            ErrorClass::Io => EXIT_IO,
        };
        let ir_error = err.downcast_ref::<Error>();
        let coded: Option<&dyn Coded> = match ir_error {
            Some(e) => Some(e),
            None => err
                .downcast_ref::<crate::commands::CodedError>()
                .map(|c| c as &dyn Coded),
        };
        let (code, status) = match coded {
            Some(c) => (c.code(), class_status(c.class())),
            None => ("INTERNAL", EXIT_INTERNAL),
        };
        let details = match ir_error {
            Some(Error::InvalidWorkload(report)) => json!({ "issues": report.issues }),
            Some(Error::AuditChain(chain_break)) => json!({ "break": chain_break }),
            _ => Value::Null,
        };
        let message = describe(err);
        if self.json {
            let mut error = json!({ "code": code, "message": message });
            if !details.is_null() {
                error["details"] = details;
            }
            let doc = json!({ "ok": false, "error": error });
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        } else {
            eprintln!("error[{code}]: {}", printable(&message, Newlines::Keep));
        }
        ExitCode::from(status)
    }
}

/// The error and its causes, each cause once: errors that already print their source in their
/// own message are not repeated.
fn describe(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}
