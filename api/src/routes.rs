//! Every route the API serves, in one table: the router dispatches from it and the OpenAPI
//! document is generated from it, so neither can list a route the other lacks.

use http::Method;
use schemars::{JsonSchema, Schema, SchemaGenerator};

use crate::model;

/// What a route does (the router's `match` is over these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Health,
    OpenApi,
    CreateSandbox,
    ListSandboxes,
    GetSandbox,
    KillSandbox,
    PauseSandbox,
    ResumeSandbox,
    SetTimeout,
    StartCommand,
    ListCommands,
    CommandEvents,
    SignalCommand,
    ResizeCommand,
    WriteStdin,
    CloseStdin,
    ReadFile,
    WriteFile,
    RemoveFile,
    ListFiles,
    StatFile,
    MakeDir,
    Rename,
    GetReceipt,
}

/// A body's kind and, for JSON, its schema.
#[derive(Clone, Copy)]
pub enum Payload {
    /// None.
    Empty,
    /// `application/json` of this type.
    Json(fn(&mut SchemaGenerator) -> Schema),
    /// `application/x-ndjson`: lines of this type, as they come.
    Ndjson(fn(&mut SchemaGenerator) -> Schema),
    /// `application/octet-stream`.
    Bytes,
}

/// A query parameter.
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// What it says.
    pub description: &'static str,
    /// Whether the route needs it.
    pub required: bool,
    /// `string`, `integer` or `boolean`.
    pub kind: &'static str,
}

/// One route.
pub struct Route {
    /// What it does.
    pub op: Op,
    /// Its method.
    pub method: Method,
    /// Its path, `{name}` for a path parameter.
    pub path: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Its query parameters.
    pub query: &'static [Param],
    /// What its request carries.
    pub request: Payload,
    /// Its success status.
    pub status: u16,
    /// What its success carries.
    pub response: Payload,
}

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

const PATH: Param = Param {
    name: "path",
    description: "A path in the sandbox (under /tmp: the agent's copy root)",
    required: true,
    kind: "string",
};

/// Every route, in the order the document lists them.
pub static ROUTES: &[Route] = &[
    Route {
        op: Op::Health,
        method: Method::GET,
        path: "/v1/health",
        summary: "The server is up: its version and process id",
        query: &[],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<model::Health>),
    },
    Route {
        op: Op::OpenApi,
        method: Method::GET,
        path: "/v1/openapi.json",
        summary: "This document",
        query: &[],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<serde_json::Value>),
    },
    Route {
        op: Op::CreateSandbox,
        method: Method::POST,
        path: "/v1/sandboxes",
        summary: "Create a sandbox from an image or a signed plan; answers once it is ready",
        query: &[],
        request: Payload::Json(schema::<model::CreateSandbox>),
        status: 201,
        response: Payload::Json(schema::<model::Sandbox>),
    },
    Route {
        op: Op::ListSandboxes,
        method: Method::GET,
        path: "/v1/sandboxes",
        summary: "List sandboxes (every named VM), by id",
        query: &[
            Param {
                name: "label",
                description: "KEY=VALUE: only sandboxes with this label (repeatable: all of them)",
                required: false,
                kind: "string",
            },
            Param {
                name: "state",
                description: "Only sandboxes in this state (running, paused, cold, …)",
                required: false,
                kind: "string",
            },
        ],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<model::SandboxList>),
    },
    Route {
        op: Op::GetSandbox,
        method: Method::GET,
        path: "/v1/sandboxes/{id}",
        summary: "One sandbox",
        query: &[],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<model::Sandbox>),
    },
    Route {
        op: Op::KillSandbox,
        method: Method::DELETE,
        path: "/v1/sandboxes/{id}",
        summary: "Stop a sandbox if it runs, and remove it",
        query: &[],
        request: Payload::Empty,
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::PauseSandbox,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/pause",
        summary: "Pause a sandbox (cold: save it to disk, holding no memory)",
        query: &[],
        request: Payload::Json(schema::<model::Pause>),
        status: 200,
        response: Payload::Json(schema::<model::Sandbox>),
    },
    Route {
        op: Op::ResumeSandbox,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/resume",
        summary: "Let a paused sandbox run again, or wake a cold one",
        query: &[],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<model::Sandbox>),
    },
    Route {
        op: Op::SetTimeout,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/timeout",
        summary: "Set the time a sandbox has left",
        query: &[],
        request: Payload::Json(schema::<model::SetTimeout>),
        status: 200,
        response: Payload::Json(schema::<model::Sandbox>),
    },
    Route {
        op: Op::StartCommand,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/commands",
        summary: "Run a command: its events streamed to its end, or (background) its id at once",
        query: &[],
        request: Payload::Json(schema::<model::StartCommand>),
        status: 200,
        response: Payload::Ndjson(schema::<model::CommandEvent>),
    },
    Route {
        op: Op::ListCommands,
        method: Method::GET,
        path: "/v1/sandboxes/{id}/commands",
        summary: "The commands started through the API, running and recently ended",
        query: &[],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<model::CommandList>),
    },
    Route {
        op: Op::CommandEvents,
        method: Method::GET,
        path: "/v1/sandboxes/{id}/commands/{cid}/events",
        summary: "A command's events: those kept (a background command's), then live, to its end",
        query: &[],
        request: Payload::Empty,
        status: 200,
        response: Payload::Ndjson(schema::<model::CommandEvent>),
    },
    Route {
        op: Op::SignalCommand,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/commands/{cid}/signal",
        summary: "Send a signal to a running command and its process group",
        query: &[],
        request: Payload::Json(schema::<model::SendSignal>),
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::ResizeCommand,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/commands/{cid}/resize",
        summary: "Resize the terminal of a command started with `pty`",
        query: &[],
        request: Payload::Json(schema::<model::PtySize>),
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::WriteStdin,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/commands/{cid}/stdin",
        summary: "Write the body to a command's standard input",
        query: &[],
        request: Payload::Bytes,
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::CloseStdin,
        method: Method::DELETE,
        path: "/v1/sandboxes/{id}/commands/{cid}/stdin",
        summary: "Close a command's standard input",
        query: &[],
        request: Payload::Empty,
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::ReadFile,
        method: Method::GET,
        path: "/v1/sandboxes/{id}/files",
        summary: "A file's bytes, streamed (cut short if they do not match the agent's digest)",
        query: &[PATH],
        request: Payload::Empty,
        status: 200,
        response: Payload::Bytes,
    },
    Route {
        op: Op::WriteFile,
        method: Method::PUT,
        path: "/v1/sandboxes/{id}/files",
        summary: "Write the body to a file (replaced whole, kept only if its digest matches)",
        query: &[
            PATH,
            Param {
                name: "mode",
                description: "Permission bits, octal (default 644)",
                required: false,
                kind: "string",
            },
            Param {
                name: "sha256",
                description: "sha256:<hex> the body must hash to",
                required: false,
                kind: "string",
            },
        ],
        request: Payload::Bytes,
        status: 200,
        response: Payload::Json(schema::<model::Written>),
    },
    Route {
        op: Op::RemoveFile,
        method: Method::DELETE,
        path: "/v1/sandboxes/{id}/files",
        summary: "Remove a file, a symlink or an empty directory (recursive: a whole tree)",
        query: &[
            PATH,
            Param {
                name: "recursive",
                description: "Remove a directory and everything in it",
                required: false,
                kind: "boolean",
            },
        ],
        request: Payload::Empty,
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::ListFiles,
        method: Method::GET,
        path: "/v1/sandboxes/{id}/files/list",
        summary: "List a directory, to a depth",
        query: &[
            PATH,
            Param {
                name: "depth",
                description: "Levels to list, 1-16 (default 1)",
                required: false,
                kind: "integer",
            },
        ],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<model::EntryList>),
    },
    Route {
        op: Op::StatFile,
        method: Method::GET,
        path: "/v1/sandboxes/{id}/files/stat",
        summary: "Describe one path (a symlink itself)",
        query: &[PATH],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<model::EntryInfo>),
    },
    Route {
        op: Op::MakeDir,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/files/mkdir",
        summary: "Create a directory",
        query: &[],
        request: Payload::Json(schema::<model::MakeDir>),
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::Rename,
        method: Method::POST,
        path: "/v1/sandboxes/{id}/files/rename",
        summary: "Rename a path",
        query: &[],
        request: Payload::Json(schema::<model::Rename>),
        status: 204,
        response: Payload::Empty,
    },
    Route {
        op: Op::GetReceipt,
        method: Method::GET,
        path: "/v1/receipts/{id}",
        summary: "A signed run receipt (a DSSE envelope; `mvm receipt verify` checks it)",
        query: &[],
        request: Payload::Empty,
        status: 200,
        response: Payload::Json(schema::<serde_json::Value>),
    },
];

/// What a request's method and path found.
pub enum Found<'a> {
    /// The route, and its path parameters in order.
    Route(&'a Route, Vec<String>),
    /// The path exists, not with this method.
    WrongMethod,
    /// No such path.
    Nothing,
}

/// The route for `method` on `path`.
pub fn find(method: &Method, path: &str) -> Found<'static> {
    let mut path_matched = false;
    for route in ROUTES {
        if let Some(params) = capture(route.path, path) {
            if route.method == *method {
                return Found::Route(route, params);
            }
            path_matched = true;
        }
    }
    if path_matched {
        Found::WrongMethod
    } else {
        Found::Nothing
    }
}

/// The path parameters of `path` under `template`, if it matches.
fn capture(template: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut wanted = template.split('/');
    let mut given = path.split('/');
    loop {
        match (wanted.next(), given.next()) {
            (None, None) => return Some(params),
            (Some(want), Some(have)) if want.starts_with('{') => {
                if have.is_empty() {
                    return None;
                }
                params.push(have.to_string());
            }
            (Some(want), Some(have)) if want == have => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_find_their_routes_and_parameters() {
        let Found::Route(route, params) =
            find(&Method::GET, "/v1/sandboxes/sbx-1/commands/7/events")
        else {
            panic!("not found");
        };
        assert_eq!(
            (route.op, params),
            (Op::CommandEvents, vec!["sbx-1".into(), "7".into()])
        );
        assert!(matches!(
            find(&Method::PATCH, "/v1/sandboxes"),
            Found::WrongMethod
        ));
        assert!(matches!(
            find(&Method::GET, "/v1/sandboxes/"),
            Found::Nothing
        ));
        assert!(matches!(find(&Method::GET, "/v1/nothing"), Found::Nothing));
        let Found::Route(route, _) = find(&Method::DELETE, "/v1/sandboxes/a/files") else {
            panic!("not found");
        };
        assert_eq!(route.op, Op::RemoveFile);
    }

    #[test]
    fn every_route_is_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    (a.method.clone(), a.path) != (b.method.clone(), b.path) && a.op != b.op,
                    "{} {}",
                    a.method,
                    a.path
                );
            }
        }
    }
}
