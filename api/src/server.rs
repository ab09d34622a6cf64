//! The server: one per mvm home, on a socket only its user can use, answering each request
//! from the route table; sandboxes whose time is up are removed here, and the server ends
//! once idle.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mvm_ir::fsutil::ExclusiveLock;
use mvm_ir::home::MvmHome;
use mvm_protocol::Request as AgentRequest;
use mvm_runner::named_vm::VmHome;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::body::{ApiBody, Part};
use crate::commands::Commands;
use crate::error::{ApiError, ErrorBody};
use crate::files::{self, Spool};
use crate::model::{
    CommandList, CommandStarted, Health, MakeDir, Pause, PtySize, Rename, SandboxList, SendSignal,
    SetTimeout, StartCommand,
};
use crate::routes::{self, Found, Op, Route};
use crate::sandboxes::Sandboxes;
use crate::{openapi, Launcher};

/// The largest JSON request body.
const MAX_JSON_BYTES: usize = 1 << 20;
/// The largest body of one write to a command's input.
const MAX_STDIN_BYTES: usize = 16 << 20;
/// How often sandboxes' timeouts and the server's idleness are looked at.
const TICK: Duration = Duration::from_secs(1);

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The mvm home it serves.
    pub home: MvmHome,
    /// Its socket (default `$MVM_HOME/api.sock`).
    pub socket: Option<PathBuf>,
    /// End after this long with no client, no command running and no sandbox's clock
    /// running; never when absent.
    pub idle_exit: Option<Duration>,
}

/// How serving ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Another server serves this home already, on this socket.
    AlreadyServing(PathBuf),
    /// It was idle for the time given.
    Idle,
    /// It was told to stop (SIGINT, SIGTERM).
    Stopped,
}

/// The server's state, shared by every request.
struct Api {
    home: MvmHome,
    sandboxes: Sandboxes,
    commands: Commands,
    /// Connections open now.
    connections: AtomicUsize,
    /// When the last connection ended or began.
    last_seen: Mutex<Instant>,
    /// Whether a sandbox's clock runs: the server stays up to end it. True until the first
    /// look.
    clocks_running: AtomicBool,
}

/// Serves until idle or told to stop. Prints one line once listening, to standard output:
/// `{"serving": SOCKET, "pid": PID}`.
pub fn serve(options: ServeOptions, launcher: Box<dyn Launcher>) -> Result<Served, ApiError> {
    let socket = match &options.socket {
        Some(socket) => socket.clone(),
        None => options.home.root().join("api.sock"),
    };
    let lock_path = options.home.root().join("api.lock");
    let Some(_lock) = ExclusiveLock::try_acquire(&lock_path)
        .map_err(|e| ApiError::Host(format!("the server's lock: {e}")))?
    else {
        return Ok(Served::AlreadyServing(socket));
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ApiError::host("the server's runtime"))?;
    let api = Arc::new(Api {
        sandboxes: Sandboxes::new(VmHome::new(options.home.clone()), launcher),
        home: options.home,
        commands: Commands::default(),
        connections: AtomicUsize::new(0),
        last_seen: Mutex::new(Instant::now()),
        clocks_running: AtomicBool::new(true),
    });
    runtime.block_on(run(api, socket, options.idle_exit))
}

async fn run(
    api: Arc<Api>,
    socket: PathBuf,
    idle_exit: Option<Duration>,
) -> Result<Served, ApiError> {
    // Under the lock: a socket left here is a dead server's.
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ApiError::host("removing the old socket")(e))
        }
        _ => {}
    }
    let listener = UnixListener::bind(&socket).map_err(ApiError::host("binding the socket"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(ApiError::host("the socket's mode"))?;
    }
    println!(
        "{}",
        serde_json::json!({"serving": socket, "pid": std::process::id()})
    );
    let me = rustix::process::getuid().as_raw();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ApiError::host("SIGTERM"))?;
    // Timeouts are enforced apart from the accept loop: removing a sandbox takes seconds.
    let reaping = Arc::clone(&api);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let api = Arc::clone(&reaping);
            let pending = tokio::task::spawn_blocking(move || api.reap())
                .await
                .unwrap_or(true);
            reaping.clocks_running.store(pending, Ordering::SeqCst);
        }
    });
    let mut tick = tokio::time::interval(TICK);
    let ended = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors, say: not a reason to spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let peer = stream.peer_cred().map(|cred| cred.uid());
                if peer.as_ref().ok() != Some(&me) {
                    eprintln!("mvm serve: refused a connection from uid {peer:?}: only uid {me} is served");
                    continue;
                }
                tokio::spawn(connection(Arc::clone(&api), stream));
            }
            _ = tick.tick() => {
                if let Some(idle_exit) = idle_exit {
                    if api.idle_for() >= idle_exit {
                        break Served::Idle;
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break Served::Stopped,
            _ = terminate.recv() => break Served::Stopped,
        }
    };
    let _ = std::fs::remove_file(&socket);
    Ok(ended)
}

/// Serves one connection.
async fn connection(api: Arc<Api>, stream: tokio::net::UnixStream) {
    api.connections.fetch_add(1, Ordering::SeqCst);
    api.touch();
    let serving = Arc::clone(&api);
    let service = service_fn(move |request| handle(Arc::clone(&serving), request));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
    api.connections.fetch_sub(1, Ordering::SeqCst);
    api.touch();
}

impl Api {
    fn touch(&self) {
        *self.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long no client has been here and nothing has needed the server.
    fn idle_for(&self) -> Duration {
        if self.connections.load(Ordering::SeqCst) > 0
            || self.commands.any_running()
            || self.clocks_running.load(Ordering::SeqCst)
        {
            return Duration::ZERO;
        }
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Removes the sandboxes whose time is up; whether any still has its clock running.
    fn reap(&self) -> bool {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (removed, pending) = self.sandboxes.reap(now);
        for id in removed {
            eprintln!("mvm serve: {id}'s time was up: removed");
            self.commands.forget(&id);
        }
        pending
    }
}

async fn handle(
    api: Arc<Api>,
    request: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let path = request.uri().path().to_string();
    let answer = match routes::find(request.method(), &path) {
        Found::Nothing => Err(ApiError::NoRoute(path)),
        Found::WrongMethod => Err(ApiError::WrongMethod {
            method: request.method().to_string(),
            path,
        }),
        Found::Route(route, params) => dispatch(api, route, params, request).await,
    };
    Ok(answer.unwrap_or_else(|error| {
        json(
            error.status(),
            &ErrorBody {
                error: error.detail(),
            },
        )
    }))
}

/// A request's query: each parameter's values, in order.
struct Query(BTreeMap<String, Vec<String>>);

impl Query {
    fn of(request: &Request<Incoming>) -> Query {
        let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
            params
                .entry(key.into_owned())
                .or_default()
                .push(value.into_owned());
        }
        Query(params)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .and_then(|values| values.first())
            .map(String::as_str)
    }

    fn path(&self) -> Result<String, ApiError> {
        match self.get("path") {
            Some(path) if path.starts_with('/') => Ok(path.to_string()),
            _ => Err(ApiError::BadRequest(
                "the query needs path=/absolute/path".into(),
            )),
        }
    }

    fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| ApiError::BadRequest(format!("{name}={text:?} is not valid"))),
        }
    }
}

async fn dispatch(
    api: Arc<Api>,
    route: &Route,
    params: Vec<String>,
    request: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let query = Query::of(&request);
    let id = params.first().cloned().unwrap_or_default();
    let status = StatusCode::from_u16(route.status).unwrap_or(StatusCode::OK);
    match route.op {
        Op::Health => Ok(json(
            status,
            &Health {
                status: "ok".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
            },
        )),
        Op::OpenApi => Ok(json(status, &openapi::document())),
        Op::CreateSandbox => {
            let spec = read_json(request).await?;
            let created = blocking(move || api.sandboxes.create(&spec)).await?;
            Ok(json(status, &created))
        }
        Op::ListSandboxes => {
            let mut labels = BTreeMap::new();
            for label in query.0.get("label").into_iter().flatten() {
                let (key, value) = label.split_once('=').ok_or_else(|| {
                    ApiError::BadRequest(format!("label={label:?} is not KEY=VALUE"))
                })?;
                labels.insert(key.to_string(), value.to_string());
            }
            let state = query.get("state").map(str::to_string);
            let sandboxes = blocking(move || api.sandboxes.list(&labels, state.as_deref())).await?;
            Ok(json(status, &SandboxList { sandboxes }))
        }
        Op::GetSandbox => Ok(json(
            status,
            &blocking(move || api.sandboxes.get(&id)).await?,
        )),
        Op::KillSandbox => {
            blocking(move || {
                api.sandboxes.kill(&id)?;
                api.commands.forget(&id);
                Ok(())
            })
            .await?;
            Ok(empty(status))
        }
        Op::PauseSandbox => {
            let pause: Pause = read_json_or_default(request).await?;
            let paused = blocking(move || api.sandboxes.pause(&id, pause.cold)).await?;
            Ok(json(status, &paused))
        }
        Op::ResumeSandbox => Ok(json(
            status,
            &blocking(move || api.sandboxes.resume(&id)).await?,
        )),
        Op::SetTimeout => {
            let timeout: SetTimeout = read_json(request).await?;
            let set = blocking(move || api.sandboxes.set_timeout(&id, timeout.timeout_s)).await?;
            Ok(json(status, &set))
        }
        Op::StartCommand => {
            let spec: StartCommand = read_json(request).await?;
            let background = spec.background;
            let started = blocking(move || {
                let vm = api.sandboxes.vm(&id)?;
                let envs = api.sandboxes.envs(&id)?;
                api.commands.start(vm, envs, spec)
            })
            .await?;
            match started.live {
                Some(mut live) if !background => {
                    let (parts, body) = mpsc::channel::<Part>(8);
                    let command = started.command;
                    tokio::spawn(async move {
                        loop {
                            let event = tokio::select! {
                                event = live.recv() => event,
                                _ = parts.closed() => None,
                            };
                            let Some(event) = event else { break };
                            if parts.send(Ok(ndjson_line(&event))).await.is_err() {
                                break;
                            }
                        }
                        if parts.is_closed() {
                            // The client went away: nobody reads the command's output, and
                            // a foreground command does not outlive its client.
                            let _ = tokio::task::spawn_blocking(move || command.signal(9)).await;
                        }
                    });
                    Ok(ndjson(status, body))
                }
                _ => Ok(json(
                    StatusCode::CREATED,
                    &CommandStarted {
                        id: started.command.id(),
                    },
                )),
            }
        }
        Op::ListCommands => {
            // The sandbox must exist, even with no command.
            let commands = blocking(move || {
                api.sandboxes.vm(&id)?;
                Ok(api.commands.list(&id))
            })
            .await?;
            Ok(json(status, &CommandList { commands }))
        }
        Op::CommandEvents => {
            let command = api.commands.get(&id, command_id(&params)?)?;
            let (parts, body) = mpsc::channel::<Part>(8);
            tokio::spawn(async move {
                let mut from = 0;
                while let Some((events, next)) = command.next_events(from).await {
                    for event in &events {
                        if parts.send(Ok(ndjson_line(event))).await.is_err() {
                            return;
                        }
                    }
                    from = next;
                }
            });
            Ok(ndjson(status, body))
        }
        Op::SignalCommand => {
            let command = api.commands.get(&id, command_id(&params)?)?;
            let signal: SendSignal = read_json(request).await?;
            blocking(move || command.signal(signal.signal)).await?;
            Ok(empty(status))
        }
        Op::ResizeCommand => {
            let command = api.commands.get(&id, command_id(&params)?)?;
            let size: PtySize = read_json(request).await?;
            blocking(move || command.resize(size)).await?;
            Ok(empty(status))
        }
        Op::WriteStdin => {
            let command = api.commands.get(&id, command_id(&params)?)?;
            let bytes = read_body(request, MAX_STDIN_BYTES).await?;
            blocking(move || command.write_stdin(&bytes)).await?;
            Ok(empty(status))
        }
        Op::CloseStdin => {
            api.commands.get(&id, command_id(&params)?)?.close_stdin();
            Ok(empty(status))
        }
        Op::ReadFile => {
            let path = query.path()?;
            let vm = blocking(move || api.sandboxes.vm(&id)).await?;
            let (parts, mut body) = mpsc::channel::<Part>(8);
            tokio::task::spawn_blocking(move || files::read(&vm, &path, parts));
            // The answer's status waits for the first part: a refusal is an error answer.
            let first = match body.recv().await {
                Some(Ok(bytes)) => Some(bytes),
                Some(Err(error)) => return Err(into_api_error(error)),
                None => None,
            };
            Ok(Response::builder()
                .status(status)
                .header("content-type", "application/octet-stream")
                .body(ApiBody::Stream { first, parts: body })
                .unwrap_or_else(|_| internal()))
        }
        Op::WriteFile => {
            let path = query.path()?;
            let mode = u32::from_str_radix(query.get("mode").unwrap_or("644"), 8)
                .ok()
                .filter(|mode| *mode <= 0o777)
                .ok_or_else(|| ApiError::BadRequest("mode is not octal up to 777".into()))?;
            let expected = query.get("sha256").map(str::to_string);
            let written = write_file(api, id, path, mode, expected, request).await?;
            Ok(json(status, &written))
        }
        Op::RemoveFile => {
            let path = query.path()?;
            let recursive = query.parsed("recursive", false)?;
            blocking(move || {
                let vm = api.sandboxes.vm(&id)?;
                files::ask(&vm, AgentRequest::FsRemove { path, recursive })
            })
            .await?;
            Ok(empty(status))
        }
        Op::ListFiles => {
            let path = query.path()?;
            let depth = query.parsed("depth", 1u32)?;
            let listing =
                blocking(move || files::list(&api.sandboxes.vm(&id)?, &path, depth)).await?;
            Ok(json(status, &listing))
        }
        Op::StatFile => {
            let path = query.path()?;
            let info = blocking(move || files::stat(&api.sandboxes.vm(&id)?, &path)).await?;
            Ok(json(status, &info))
        }
        Op::MakeDir => {
            let dir: MakeDir = read_json(request).await?;
            blocking(move || {
                let vm = api.sandboxes.vm(&id)?;
                let request = AgentRequest::FsMkdir {
                    path: dir.path,
                    mode: dir.mode.unwrap_or(0o755),
                };
                files::ask(&vm, request)
            })
            .await?;
            Ok(empty(status))
        }
        Op::Rename => {
            let rename: Rename = read_json(request).await?;
            blocking(move || {
                let vm = api.sandboxes.vm(&id)?;
                let request = AgentRequest::FsMove {
                    from: rename.from,
                    to: rename.to,
                };
                files::ask(&vm, request)
            })
            .await?;
            Ok(empty(status))
        }
        Op::GetReceipt => {
            if !mvm_ir::digest::is_sha256_hex(&id) {
                return Err(ApiError::BadRequest(format!(
                    "{id:?} is not a receipt id (64 hex digits)"
                )));
            }
            let file = api.home.root().join("receipts").join(format!("{id}.json"));
            match tokio::fs::read(&file).await {
                Ok(bytes) => Ok(Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(ApiBody::whole(bytes))
                    .unwrap_or_else(|_| internal())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(ApiError::NotFound(format!("no receipt {id}")))
                }
                Err(e) => Err(ApiError::host("reading the receipt")(e)),
            }
        }
    }
}

/// Spools the request's body (the blocking side writes it to a file as it comes), then
/// writes it into the sandbox.
async fn write_file(
    api: Arc<Api>,
    id: String,
    path: String,
    mode: u32,
    expected: Option<String>,
    request: Request<Incoming>,
) -> Result<crate::model::Written, ApiError> {
    let (chunks, mut arriving) = mpsc::channel::<Bytes>(8);
    let spooling = tokio::task::spawn_blocking(move || {
        let vm = api.sandboxes.vm(&id)?;
        let mut spool = Spool::new(api.home.root())?;
        while let Some(chunk) = arriving.blocking_recv() {
            spool.push(&chunk)?;
        }
        spool.write_to(&vm, &path, mode, expected.as_deref())
    });
    let mut body = request.into_body();
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if chunks.send(data).await.is_err() {
                // The spool refused it (too large): its error is the answer.
                complete = false;
                break;
            }
        }
    }
    drop(chunks);
    let written = spooling
        .await
        .map_err(|e| ApiError::Host(format!("the spool: {e}")))?;
    if written.is_ok() && !complete {
        return Err(ApiError::Host("the spool stopped early".into()));
    }
    written
}

/// Runs blocking work (the runner library's calls) off the server's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Host(format!("a worker thread: {e}")))?
}

fn command_id(params: &[String]) -> Result<u64, ApiError> {
    let text = params.get(1).map(String::as_str).unwrap_or("");
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("{text:?} is not a command id")))
}

async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::TooLarge(limit as u64))
        }
        Err(e) => Err(ApiError::BadRequest(format!("the body: {e}"))),
    }
}

async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = read_body(request, MAX_JSON_BYTES).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("the body: {e}")))
}

/// A JSON body, or the default for an empty one.
async fn read_json_or_default<T: DeserializeOwned + Default>(
    request: Request<Incoming>,
) -> Result<T, ApiError> {
    let bytes = read_body(request, MAX_JSON_BYTES).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("the body: {e}")))
}

/// The API error a streamed part carried, or a failure of the host.
fn into_api_error(error: std::io::Error) -> ApiError {
    match error.into_inner().map(|inner| inner.downcast::<ApiError>()) {
        Some(Ok(api)) => *api,
        Some(Err(other)) => ApiError::Host(other.to_string()),
        None => ApiError::Host("the stream failed".into()),
    }
}

fn ndjson_line(value: &impl Serialize) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<ApiBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(ApiBody::whole(
            serde_json::to_vec(value).unwrap_or_default(),
        ))
        .unwrap_or_else(|_| internal())
}

fn ndjson(status: StatusCode, parts: mpsc::Receiver<Part>) -> Response<ApiBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-ndjson")
        .body(ApiBody::stream(parts))
        .unwrap_or_else(|_| internal())
}

fn empty(status: StatusCode) -> Response<ApiBody> {
    Response::builder()
        .status(status)
        .body(ApiBody::empty())
        .unwrap_or_else(|_| internal())
}

fn internal() -> Response<ApiBody> {
    let mut response = Response::new(ApiBody::empty());
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}
