"""The connection to mvm's local API: HTTP/1.1 on ``$MVM_HOME/api.sock``, the server started
on demand (``mvm serve --idle-exit 10m``) when none answers.

Every call of the SDK is written once, without I/O: an *op* is a generator that yields the
:class:`Call`\\ s it needs one at a time, is sent what each answered (or has the
:class:`SandboxException` it failed with thrown into it) and returns what its caller gets.
:class:`Api` (``httpx.Client``, for :class:`~mvm.Sandbox`) and :class:`AsyncApi`
(``httpx.AsyncClient``, for :class:`~mvm.AsyncSandbox`) only carry the calls out."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import threading
import time
import weakref
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Generator,
    Generic,
    Iterator,
    List,
    Optional,
    Protocol,
    Tuple,
    TypeVar,
    Union,
)

import httpx

from .exceptions import SandboxException, from_answer

#: How long a started server has to answer.
START_WAIT_S = 15.0
#: How long the server the SDK starts stays up with nothing to do.
IDLE_EXIT = "10m"

T = TypeVar("T")

#: An op: yields calls, is sent their answers, returns its result.
Op = Generator["Call", Any, T]
#: A callback to call and what to call it with: text, or a terminal's bytes.
Output = Tuple[Callable[[Any], object], Union[str, bytes]]


def mvm_home() -> Path:
    """``$MVM_HOME``, else ``~/.mvm`` — as mvm itself finds it."""
    home = os.environ.get("MVM_HOME")
    if home:
        return Path(home)
    return Path.home() / ".mvm"


def socket_path() -> Path:
    """The API's socket: ``$MVM_API_SOCKET``, else ``$MVM_HOME/api.sock``."""
    given = os.environ.get("MVM_API_SOCKET")
    return Path(given) if given else mvm_home() / "api.sock"


def mvm_binary() -> str:
    """The ``mvm`` to start the server with: ``$MVM_BIN``, else ``mvm`` on the PATH."""
    return os.environ.get("MVM_BIN", "mvm")


class Follower(Protocol):
    """Reads a streamed answer as its bytes come (a command's events): told the answer's
    content type, fed its bytes, it returns the callbacks to call meanwhile; its
    ``outcome()`` is what the op is sent once it has ``ended`` or the answer is over."""

    @property
    def ended(self) -> bool: ...

    def begin(self, content_type: str) -> None: ...

    def feed(self, chunk: bytes) -> List[Output]: ...

    def outcome(self) -> Any: ...


@dataclass(frozen=True)
class Call:
    """One request of an op, and what the op is sent back for it."""

    method: str
    path: str
    params: Any = None
    json: Any = None
    #: The body: bytes, or chunks (an iterator; for AsyncApi also an async iterable).
    content: Any = None
    #: The answer's JSON (``None`` for an empty body), its ``bytes``, or a ``stream`` of its
    #: bytes (opened when first read).
    answer: str = "json"
    #: Reads the answer as it comes; the op is sent its ``outcome()``.
    follow: Optional[Follower] = None

    def options(self) -> Dict[str, Any]:
        """httpx's keyword arguments for it."""
        given = {"params": self.params, "json": self.json, "content": self.content}
        return {key: value for key, value in given.items() if value is not None}


def check(answer: httpx.Response) -> None:
    """Raises the SDK's exception for an error answer."""
    if answer.status_code < 400:
        return
    try:
        body = answer.json()
    except ValueError:
        body = {}
    raise from_answer(answer.status_code, body)


def replayable(call: Call) -> bool:
    """Whether ``call`` can be sent again: its body is not a stream read as it was sent."""
    return call.content is None or isinstance(call.content, bytes)


def broken(socket: Path, error: httpx.TransportError) -> SandboxException:
    """A connection to the server that failed, as the SDK's exception."""
    return SandboxException(
        f"the connection to the mvm server on {socket} broke: {error}", "API006"
    )


def answer_of(call: Call, answer: httpx.Response) -> Any:
    """What an op is sent for the whole ``answer`` to ``call``; raises for an error answer."""
    check(answer)
    if call.answer == "bytes":
        return answer.content
    return answer.json() if answer.content else None


class Step(Generic[T]):
    """An op under way: ``call`` is what it asks for next until it is ``done``; ``value`` is
    what it returned."""

    value: T

    def __init__(self, op: Op[T]):
        self._op = op
        self.done = False
        self.call: Call
        self.feed(None)

    def feed(self, answer: Any) -> None:
        """Sends the op the answer to its call; a :class:`SandboxException` is thrown into it."""
        try:
            if isinstance(answer, SandboxException):
                self.call = self._op.throw(answer)
            else:
                self.call = self._op.send(answer)
        except StopIteration as stop:
            self.done = True
            self.value = stop.value


#: httpx's options for a client of the server, but its transport.
CLIENT_OPTIONS: Dict[str, Any] = {
    "base_url": "http://mvm",
    "timeout": httpx.Timeout(None, connect=10.0),
}


class Server:
    """The server on ``socket``: found, or started when none answers (``autostart``).
    Thread-safe: :class:`AsyncApi` runs :meth:`ensure` in a thread."""

    #: One start at a time in this process.
    _lock = threading.Lock()

    def __init__(self, socket: Path, autostart: bool = True):
        self.socket = socket
        self.autostart = autostart

    def ensure(self) -> None:
        """Returns once a server answers; raises if none does and none can be started."""
        with self._lock:
            if self.answers():
                return
            if not self.autostart:
                raise SandboxException(f"no mvm server answers on {self.socket}", "API006")
            self._start()

    def answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with httpx.Client(
                transport=httpx.HTTPTransport(uds=str(self.socket)),
                base_url="http://mvm",
                timeout=5.0,
            ) as probe:
                return probe.get("/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    def _start(self) -> None:
        args = [mvm_binary(), "serve", "--idle-exit", IDLE_EXIT]
        if os.environ.get("MVM_API_SOCKET"):
            args += ["--socket", str(self.socket)]
        try:
            subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            raise SandboxException(f"starting {args[0]} serve: {e}", "API006") from e
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            if self.answers():
                return
            time.sleep(0.05)
        raise SandboxException(f"mvm serve did not answer on {self.socket}", "API006")


class _Connection:
    """What :class:`Api` and :class:`AsyncApi` share: the server they talk to."""

    def __init__(self, socket: Optional[Path] = None, autostart: bool = True):
        self.server = Server(Path(socket) if socket else socket_path(), autostart)
        self.socket = self.server.socket
        self.autostart = autostart


class Api(_Connection):
    """One connection pool to the server, for :class:`~mvm.Sandbox`."""

    def __init__(self, socket: Optional[Path] = None, autostart: bool = True):
        super().__init__(socket, autostart)
        self._client: Optional[httpx.Client] = None

    def client(self) -> httpx.Client:
        if self._client is None:
            self.server.ensure()
            self._client = httpx.Client(
                transport=httpx.HTTPTransport(uds=str(self.socket)), **CLIENT_OPTIONS
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def run(self, op: Op[T]) -> T:
        """Carries out ``op``'s calls; what it returns."""
        step = Step(op)
        while not step.done:
            step.feed(self._answer(step.call))
        return step.value

    def _answer(self, call: Call) -> Any:
        """What ``call`` answered, or the exception it failed with. A server that is not
        there (gone idle, stopped) is started again and the call sent to it once more."""
        try:
            try:
                return self._send(call)
            except httpx.ConnectError:
                if not replayable(call):
                    raise
                self.close()
                return self._send(call)
        except httpx.TransportError as e:
            return broken(self.socket, e)
        except SandboxException as e:
            return e

    def _send(self, call: Call) -> Any:
        if call.follow is not None:
            return self._follow(call, call.follow)
        if call.answer == "stream":
            return self._stream(call)
        return answer_of(call, self.client().request(call.method, call.path, **call.options()))

    def _follow(self, call: Call, follow: Follower) -> Any:
        with self._open(call) as answer:
            follow.begin(answer.headers.get("content-type", ""))
            for chunk in answer.iter_bytes():
                for callback, text in follow.feed(chunk):
                    callback(text)
                if follow.ended:
                    break
        return follow.outcome()

    def _stream(self, call: Call) -> Iterator[bytes]:
        try:
            with self._open(call) as answer:
                yield from answer.iter_bytes()
        except httpx.TransportError as e:
            raise broken(self.socket, e) from e

    @contextmanager
    def _open(self, call: Call) -> Iterator[httpx.Response]:
        """The answer to ``call``, streamed; raises for an error answer."""
        with self.client().stream(call.method, call.path, **call.options()) as answer:
            if answer.status_code >= 400:
                answer.read()
                check(answer)
            yield answer

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        answer = self.client().request(method, path, **kwargs)
        check(answer)
        return answer

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.request(method, path, **kwargs)
        return answer.json() if answer.content else None


class AsyncApi(_Connection):
    """Connections to the server for :class:`~mvm.AsyncSandbox`: an ``httpx.AsyncClient``
    per event loop (a client is bound to the loop it is first used in), so one AsyncApi, and
    the sandboxes made with it, serve any number of ``asyncio.run``\\ s."""

    def __init__(self, socket: Optional[Path] = None, autostart: bool = True):
        super().__init__(socket, autostart)
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, httpx.AsyncClient
        ] = weakref.WeakKeyDictionary()

    async def client(self) -> httpx.AsyncClient:
        """The running loop's client (the server found or started the first time)."""
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            await asyncio.to_thread(self.server.ensure)
            # Another task of this loop may have made it meanwhile.
            if loop not in self._clients:
                self._clients[loop] = httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=str(self.socket)), **CLIENT_OPTIONS
                )
        return self._clients[loop]

    async def aclose(self) -> None:
        """Closes the running loop's client (the next call makes another)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def run(self, op: Op[T]) -> T:
        """Carries out ``op``'s calls; what it returns."""
        step = Step(op)
        while not step.done:
            step.feed(await self._answer(step.call))
        return step.value

    async def _answer(self, call: Call) -> Any:
        """What ``call`` answered, or the exception it failed with; as :meth:`Api._answer`."""
        try:
            try:
                return await self._send(call)
            except httpx.ConnectError:
                if not replayable(call):
                    raise
                await self.aclose()
                return await self._send(call)
        except httpx.TransportError as e:
            return broken(self.socket, e)
        except SandboxException as e:
            return e

    async def _send(self, call: Call) -> Any:
        if call.follow is not None:
            return await self._follow(call, call.follow)
        if call.answer == "stream":
            return self._stream(call)
        client = await self.client()
        sent = await client.request(call.method, call.path, **_async_options(call))
        return answer_of(call, sent)

    async def _follow(self, call: Call, follow: Follower) -> Any:
        async with self._open(call) as answer:
            follow.begin(answer.headers.get("content-type", ""))
            async for chunk in answer.aiter_bytes():
                for callback, text in follow.feed(chunk):
                    told = callback(text)
                    if inspect.isawaitable(told):
                        await told
                if follow.ended:
                    break
        return follow.outcome()

    async def _stream(self, call: Call) -> AsyncIterator[bytes]:
        try:
            async with self._open(call) as answer:
                async for chunk in answer.aiter_bytes():
                    yield chunk
        except httpx.TransportError as e:
            raise broken(self.socket, e) from e

    @asynccontextmanager
    async def _open(self, call: Call) -> AsyncIterator[httpx.Response]:
        """The answer to ``call``, streamed; raises for an error answer."""
        client = await self.client()
        async with client.stream(call.method, call.path, **_async_options(call)) as answer:
            if answer.status_code >= 400:
                await answer.aread()
                check(answer)
            yield answer


def _async_options(call: Call) -> Dict[str, Any]:
    """httpx's keyword arguments for ``call`` sent by an AsyncClient: a body of sync chunks
    (a file object's) is read in a thread, chunk by chunk, not in the event loop."""
    options = call.options()
    if isinstance(options.get("content"), Iterator):
        options["content"] = _in_thread(options["content"])
    return options


async def _in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    while True:
        chunk = await asyncio.to_thread(next, chunks, None)
        if chunk is None:
            return
        yield chunk


_shared: Optional[Api] = None
_shared_async: Optional[AsyncApi] = None


def shared() -> Api:
    """The process's connection, made on first use."""
    global _shared
    if _shared is None:
        _shared = Api()
    return _shared


def shared_async() -> AsyncApi:
    """The process's async connections, made on first use."""
    global _shared_async
    if _shared_async is None:
        _shared_async = AsyncApi()
    return _shared_async
