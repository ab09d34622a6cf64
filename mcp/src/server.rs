//! `mvm mcp`: the MCP server over stdio. Each tool is a thin, async face of one
//! [`Service`] call, run on a blocking thread after the call is audited; a failure is a tool
//! result with `isError` and the failure's code and class in its text (no structured content,
//! so that no client checks an error against the tool's output schema), never a protocol
//! error.

use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::{tool, tool_router, ErrorData, Json, ServerHandler, ServiceExt};
use serde::Serialize;

use crate::params::{
    CreateParams, ExecOutput, ExecParams, FileContent, FilesListParams, FilesReadParams,
    FilesWriteParams, ListParams, PauseParams, Removed, RunCodeParams, SandboxInfo, SandboxList,
    SandboxRef,
};
use crate::service::Service;
use crate::{FailureClass, ToolFailure};
use mvm_api::model::{EntryList, Written};

/// How often expired sandboxes are looked for.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// What the server tells a client about itself.
const INSTRUCTIONS: &str = "Sandboxes are microVMs with no network unless granted. \
sandbox_run_code runs a program in a fresh sandbox (removed after) or in one made with \
sandbox_create; sandbox_exec runs a command (no shell: [\"sh\", \"-c\", …]); files live under \
/tmp. A failure is a result with isError and a stable code.";

/// The MCP server: mvm's sandboxes as tools.
#[derive(Clone)]
pub struct McpServer {
    service: Arc<Service>,
    tool_router: ToolRouter<Self>,
}

impl McpServer {
    /// A server doing its work through `service`.
    pub fn new(service: Service) -> Self {
        Self {
            service: Arc::new(service),
            tool_router: Self::tool_router(),
        }
    }

    /// Audits the call of `tool` with `params`, then runs `work` on a blocking thread.
    async fn call<P, T>(
        &self,
        tool: &'static str,
        params: P,
        work: impl FnOnce(&Service, P) -> Result<T, ToolFailure> + Send + 'static,
    ) -> Result<Json<T>, CallToolResult>
    where
        P: Serialize + Send + 'static,
        T: Send + 'static,
    {
        let service = Arc::clone(&self.service);
        let done = tokio::task::spawn_blocking(move || {
            service.audit(tool, &params)?;
            work(&service, params)
        })
        .await
        .unwrap_or_else(|e| {
            Err(ToolFailure::new(
                FailureClass::Transport,
                crate::failure::codes::MCP007,
                format!("the call's thread: {e}"),
            ))
        });
        done.map(Json)
            .map_err(|failure| CallToolResult::error(vec![ContentBlock::text(failure.to_string())]))
    }

    /// The tools this server offers, with their schemas, as `tools/list` gives them.
    pub fn tools(&self) -> Vec<Tool> {
        self.tool_router.list_all()
    }
}

#[tool_router]
impl McpServer {
    #[tool(
        name = "sandbox_create",
        description = "Start a sandbox (a microVM) from an allowed image, REFERENCE@sha256:DIGEST. \
No network unless allow_hosts grants hosts. Lives timeout_seconds (300 unless given) while running."
    )]
    async fn sandbox_create(
        &self,
        Parameters(p): Parameters<CreateParams>,
    ) -> Result<Json<SandboxInfo>, CallToolResult> {
        self.call("sandbox_create", p, |s, p| s.create(&p)).await
    }

    #[tool(
        name = "sandbox_run_code",
        description = "Run a python, node or shell program in a sandbox: sandbox_id's, or a fresh \
one of the server's default image, removed after. Returns exit_code, stdout, stderr; a non-zero \
exit is a result, not an error."
    )]
    async fn sandbox_run_code(
        &self,
        Parameters(p): Parameters<RunCodeParams>,
    ) -> Result<Json<ExecOutput>, CallToolResult> {
        self.call("sandbox_run_code", p, |s, p| s.run_code(&p))
            .await
    }

    #[tool(
        name = "sandbox_exec",
        description = "Run a command (argv, no shell) in a sandbox to its end. Returns exit_code, \
stdout, stderr (capped: truncated), timed_out, audit_id."
    )]
    async fn sandbox_exec(
        &self,
        Parameters(p): Parameters<ExecParams>,
    ) -> Result<Json<ExecOutput>, CallToolResult> {
        self.call("sandbox_exec", p, |s, p| {
            let timeout = s.timeout(p.timeout_seconds)?;
            s.exec(&p.sandbox_id, p.command, p.cwd, &p.env, timeout)
        })
        .await
    }

    #[tool(
        name = "sandbox_files_read",
        description = "Read a file under /tmp of a sandbox, as UTF-8 text or base64 (size-capped)."
    )]
    async fn sandbox_files_read(
        &self,
        Parameters(p): Parameters<FilesReadParams>,
    ) -> Result<Json<FileContent>, CallToolResult> {
        self.call("sandbox_files_read", p, |s, p| {
            s.read_file(&p.sandbox_id, &p.path, p.encoding)
        })
        .await
    }

    #[tool(
        name = "sandbox_files_write",
        description = "Write a file under /tmp of a sandbox (its directory must exist), from text \
or base64 (size-capped)."
    )]
    async fn sandbox_files_write(
        &self,
        Parameters(p): Parameters<FilesWriteParams>,
    ) -> Result<Json<Written>, CallToolResult> {
        self.call("sandbox_files_write", p, |s, p| {
            let bytes = Service::decode(&p.content, p.encoding)?;
            s.write_file(&p.sandbox_id, &p.path, &bytes, p.mode)
        })
        .await
    }

    #[tool(
        name = "sandbox_files_list",
        description = "List a directory under /tmp of a sandbox, to depth levels (1-4)."
    )]
    async fn sandbox_files_list(
        &self,
        Parameters(p): Parameters<FilesListParams>,
    ) -> Result<Json<EntryList>, CallToolResult> {
        self.call("sandbox_files_list", p, |s, p| {
            s.list_files(&p.sandbox_id, &p.path, p.depth.unwrap_or(1))
        })
        .await
    }

    #[tool(
        name = "sandbox_list",
        description = "The sandboxes this server made, with their state; only those with every label given."
    )]
    async fn sandbox_list(
        &self,
        Parameters(p): Parameters<ListParams>,
    ) -> Result<Json<SandboxList>, CallToolResult> {
        self.call("sandbox_list", p, |s, p| {
            s.list(&p.labels).map(|sandboxes| SandboxList { sandboxes })
        })
        .await
    }

    #[tool(
        name = "sandbox_pause",
        description = "Pause a sandbox; cold: save it to disk too (no memory held, its clock stopped)."
    )]
    async fn sandbox_pause(
        &self,
        Parameters(p): Parameters<PauseParams>,
    ) -> Result<Json<SandboxInfo>, CallToolResult> {
        self.call("sandbox_pause", p, |s, p| s.pause(&p.sandbox_id, p.cold))
            .await
    }

    #[tool(
        name = "sandbox_resume",
        description = "Let a paused or cold sandbox run again."
    )]
    async fn sandbox_resume(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<Json<SandboxInfo>, CallToolResult> {
        self.call("sandbox_resume", p, |s, p| s.resume(&p.sandbox_id))
            .await
    }

    #[tool(
        name = "sandbox_stop",
        description = "Stop a sandbox, keeping it until sandbox_remove."
    )]
    async fn sandbox_stop(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<Json<SandboxInfo>, CallToolResult> {
        self.call("sandbox_stop", p, |s, p| s.stop(&p.sandbox_id))
            .await
    }

    #[tool(
        name = "sandbox_remove",
        description = "Stop a sandbox if it runs and remove it."
    )]
    async fn sandbox_remove(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<Json<Removed>, CallToolResult> {
        self.call("sandbox_remove", p, |s, p| {
            s.remove(&p.sandbox_id).map(|()| Removed {
                sandbox_id: p.sandbox_id,
            })
        })
        .await
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("mvm", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let call = ToolCallContext::new(self, request, context);
        Ok(match self.tool_router.call(call).await? {
            CallToolResponse::Complete(result) => CallToolResponse::Complete(coded(result)),
            other => other,
        })
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tool_router.get(name).cloned()
    }
}

/// The SDK's refusal of arguments that do not deserialize (an unknown field, a wrong type),
/// given mvm's code like every other refusal: `MCP001 validation: …`.
fn coded(result: CallToolResult) -> CallToolResult {
    let refused_arguments = result.is_error == Some(true)
        && result.content.iter().any(|block| {
            block
                .as_text()
                .is_some_and(|text| text.text.starts_with("failed to deserialize parameters"))
        });
    if !refused_arguments {
        return result;
    }
    let said: Vec<String> = result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|text| text.text.clone()))
        .collect();
    let failure = ToolFailure::invalid(format!("the arguments: {}", said.join(" ")));
    CallToolResult::error(vec![ContentBlock::text(failure.to_string())])
}

/// [`serve_stdio`] on a runtime of its own, until the client closes stdin.
pub fn run_stdio(server: McpServer) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve_stdio(server))
}

/// Serves `server` on stdin and stdout until the client closes stdin, removing expired
/// sandboxes meanwhile.
pub async fn serve_stdio(
    server: McpServer,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let service = Arc::clone(&server.service);
    let reaper = tokio::spawn(async move {
        let mut every = tokio::time::interval(REAP_EVERY);
        loop {
            every.tick().await;
            let service = Arc::clone(&service);
            let _ = tokio::task::spawn_blocking(move || service.reap()).await;
        }
    });
    let running = server.serve(rmcp::transport::stdio()).await?;
    let ended = running.waiting().await;
    reaper.abort();
    ended?;
    Ok(())
}
