"""Commands in a sandbox: run to completion, or in the background with a handle."""

from __future__ import annotations

import base64
import codecs
import json
from dataclasses import dataclass
from typing import (
    Awaitable,
    Callable,
    Dict,
    Generic,
    List,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from ._api import Api, AsyncApi, Call, Op, Output
from .exceptions import CommandExitException, SandboxException, TimeoutException, error_for

#: Called with a command's output (decoded UTF-8) as it comes.
OutputCallback = Callable[[str], None]
#: For :class:`~mvm.AsyncSandbox`: a function or a coroutine function (awaited, in order).
AsyncOutputCallback = Callable[[str], Optional[Awaitable[object]]]
Cmd = Union[str, Sequence[str]]

#: A background command's handle: :class:`CommandHandle` or :class:`AsyncCommandHandle`.
H = TypeVar("H")
_Callback = Optional[Callable[[str], object]]


@dataclass
class CommandResult:
    """How a command ended and what it wrote."""

    stdout: str
    stderr: str
    exit_code: int
    error: Optional[str] = None
    #: Milliseconds from its start to its end.
    duration_ms: int = 0
    #: The id of its signed run receipt (``Sandbox.receipt(id)``).
    receipt: str = ""
    #: The signal that ended it, if one did.
    signal: Optional[int] = None
    timed_out: bool = False


@dataclass
class ProcessInfo:
    """A command the API started."""

    pid: int
    cmd: List[str]
    running: bool
    exit_code: Optional[int] = None


class CommandEvents:
    """A command's event stream (NDJSON: ``started``, ``stdout``/``stderr`` with base64 data,
    then ``ended`` or ``error``), fed its bytes as they come. It returns the output to pass
    to the callbacks (UTF-8, decoded across event boundaries) and, once over, the command's
    result or the exception for how it ended. Without I/O: :class:`~mvm._api.Api` and
    :class:`~mvm._api.AsyncApi` feed it."""

    def __init__(self, on_stdout: _Callback = None, on_stderr: _Callback = None):
        self._on = {"stdout": on_stdout, "stderr": on_stderr}
        self._text: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        self._decoders = {
            kind: codecs.getincrementaldecoder("utf-8")(errors="replace") for kind in self._text
        }
        self._pending = bytearray()
        self._lines = True
        #: The ``ended`` or ``error`` event.
        self._last: Optional[dict] = None

    @property
    def ended(self) -> bool:
        return self._last is not None

    def begin(self, content_type: str) -> None:
        """The answer's content type: a body other than NDJSON is one event, whole."""
        self._lines = "ndjson" in content_type

    def feed(self, chunk: bytes) -> List[Output]:
        """Takes the answer's next bytes; the callbacks to call now, in order, with their
        text."""
        self._pending += chunk
        told: List[Output] = []
        while self._lines and not self.ended:
            end = self._pending.find(b"\n")
            if end < 0:
                break
            line = bytes(self._pending[:end])
            del self._pending[: end + 1]
            if line.strip():
                told += self._event(json.loads(line))
        return told

    def _event(self, event: dict) -> List[Output]:
        kind = event.get("type")
        if kind == "stdout" or kind == "stderr":
            return self._add(kind, self._decoders[kind].decode(base64.b64decode(event["data"])))
        if kind == "ended":
            self._last = event
            return [
                told
                for stream, decoder in self._decoders.items()
                for told in self._add(stream, decoder.decode(b"", final=True))
            ]
        if kind == "error":
            self._last = event
        return []

    def _add(self, kind: str, text: str) -> List[Output]:
        if not text:
            return []
        self._text[kind].append(text)
        callback = self._on[kind]
        return [(callback, text)] if callback is not None else []

    def outcome(self) -> CommandResult:
        """The command's result, once the answer is over; raises for how it ended otherwise:
        :class:`TimeoutException`, :class:`CommandExitException`, the agent's refusal."""
        if not self.ended and self._pending.strip():
            self._event(json.loads(bytes(self._pending)))
        end = self._last
        if end is None:
            raise SandboxException(
                "the command's event stream ended before the command", "API006"
            )
        if end.get("type") == "error":
            raise error_for(end.get("code", "API006"), end.get("message", ""))
        result = CommandResult(
            stdout="".join(self._text["stdout"]),
            stderr="".join(self._text["stderr"]),
            exit_code=end["exit_code"],
            error="timed out" if end.get("timed_out") else None,
            duration_ms=end.get("duration_ms", 0),
            receipt=end.get("receipt", ""),
            signal=end.get("signal"),
            timed_out=bool(end.get("timed_out")),
        )
        if result.timed_out:
            raise TimeoutException(
                "the command ran past its timeout and was killed", code="TIMEOUT"
            )
        if result.exit_code != 0:
            raise CommandExitException(result)
        return result


def argv_of(cmd: Sequence[str]) -> List[str]:
    """A command given as an argv, checked."""
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("cmd is a string, or a non-empty sequence of strings")
    return argv


class _HandleOps:
    """What :class:`CommandHandle` and :class:`AsyncCommandHandle` do, as ops."""

    def __init__(self, sandbox_id: str, pid: int):
        self._sandbox = sandbox_id
        self.pid = pid

    def _path(self, tail: str = "") -> str:
        return f"/v1/sandboxes/{self._sandbox}/commands/{self.pid}{tail}"

    def _wait_op(self, on_stdout: _Callback, on_stderr: _Callback) -> Op[CommandResult]:
        follow = CommandEvents(on_stdout, on_stderr)
        result: CommandResult = yield Call("GET", self._path("/events"), follow=follow)
        return result

    def _signal_op(self, signal: int) -> Op[bool]:
        try:
            yield Call("POST", self._path("/signal"), json={"signal": signal})
            return True
        except SandboxException as e:
            if e.status == 404:
                return False
            raise

    def _send_stdin_op(self, data: Union[str, bytes]) -> Op[None]:
        body = data.encode() if isinstance(data, str) else data
        yield Call("POST", self._path("/stdin"), content=body)

    def _close_stdin_op(self) -> Op[None]:
        yield Call("DELETE", self._path("/stdin"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pid={self.pid!r})"


class CommandHandle(_HandleOps):
    """A command running in the background."""

    def __init__(self, api: Api, sandbox_id: str, pid: int):
        super().__init__(sandbox_id, pid)
        self._api = api

    def wait(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> CommandResult:
        """Waits for its end (its output so far first); raises
        :class:`CommandExitException` on a non-zero exit."""
        return self._api.run(self._wait_op(on_stdout, on_stderr))

    def kill(self) -> bool:
        """Kills it (SIGKILL); ``False`` if it had ended already."""
        return self.send_signal(9)

    def send_signal(self, signal: int) -> bool:
        """Sends ``signal``; ``False`` if it had ended already."""
        return self._api.run(self._signal_op(signal))

    def send_stdin(self, data: Union[str, bytes]) -> None:
        """Writes to its standard input (it must have been started with ``stdin=True``)."""
        self._api.run(self._send_stdin_op(data))

    def close_stdin(self) -> None:
        """Closes its standard input: it reads end of file."""
        self._api.run(self._close_stdin_op())


class AsyncCommandHandle(_HandleOps):
    """A command running in the background, for :class:`~mvm.AsyncSandbox`."""

    def __init__(self, api: AsyncApi, sandbox_id: str, pid: int):
        super().__init__(sandbox_id, pid)
        self._api = api

    async def wait(
        self,
        on_stdout: Optional[AsyncOutputCallback] = None,
        on_stderr: Optional[AsyncOutputCallback] = None,
    ) -> CommandResult:
        """Waits for its end (its output so far first; the callbacks may be coroutine
        functions); raises :class:`CommandExitException` on a non-zero exit."""
        return await self._api.run(self._wait_op(on_stdout, on_stderr))

    async def kill(self) -> bool:
        """Kills it (SIGKILL); ``False`` if it had ended already."""
        return await self.send_signal(9)

    async def send_signal(self, signal: int) -> bool:
        """Sends ``signal``; ``False`` if it had ended already."""
        return await self._api.run(self._signal_op(signal))

    async def send_stdin(self, data: Union[str, bytes]) -> None:
        """Writes to its standard input (it must have been started with ``stdin=True``)."""
        await self._api.run(self._send_stdin_op(data))

    async def close_stdin(self) -> None:
        """Closes its standard input: it reads end of file."""
        await self._api.run(self._close_stdin_op())


class _CommandsOps(Generic[H]):
    """What :class:`Commands` and :class:`AsyncCommands` do, as ops."""

    #: How a string command is run.
    shell: Sequence[str] = ("sh", "-c")

    def __init__(self, sandbox_id: str):
        self._sandbox = sandbox_id
        self._path = f"/v1/sandboxes/{sandbox_id}/commands"

    def _handle(self, pid: int) -> H:
        raise NotImplementedError

    def _shell_op(self) -> Op[Sequence[str]]:
        """How a string command is run (an op: the E2B layer asks the sandbox)."""
        yield from ()
        return self.shell

    def _run_op(
        self,
        cmd: Cmd,
        background: bool,
        envs: Optional[Dict[str, str]],
        cwd: Optional[str],
        user: Optional[str],
        timeout: Optional[float],
        on_stdout: _Callback,
        on_stderr: _Callback,
        stdin: bool,
    ) -> Op[Union[CommandResult, H]]:
        # A string goes through the shell (only then is it looked up); a list is the argv.
        argv = [*(yield from self._shell_op()), cmd] if isinstance(cmd, str) else argv_of(cmd)
        spec: dict = {"argv": argv, "background": background, "stdin": stdin}
        if envs:
            spec["envs"] = dict(envs)
        if cwd is not None:
            spec["cwd"] = cwd
        if user is not None:
            spec["user"] = user
        spec["timeout_s"] = int(timeout) if timeout else 0
        if background:
            started = yield Call("POST", self._path, json=spec)
            return self._handle(started["id"])
        return (yield from self._foreground_op(spec, on_stdout, on_stderr))

    def _foreground_op(
        self, spec: dict, on_stdout: _Callback, on_stderr: _Callback
    ) -> Op[CommandResult]:
        follow = CommandEvents(on_stdout, on_stderr)
        result: CommandResult = yield Call("POST", self._path, json=spec, follow=follow)
        return result

    def _list_op(self) -> Op[List[ProcessInfo]]:
        listed = yield Call("GET", self._path)
        return [
            ProcessInfo(
                pid=c["id"],
                cmd=c["argv"],
                running=c["running"],
                exit_code=(c.get("end") or {}).get("exit_code"),
            )
            for c in listed["commands"]
        ]


class Commands(_CommandsOps[CommandHandle]):
    """``sandbox.commands``."""

    def __init__(self, api: Api, sandbox_id: str):
        super().__init__(sandbox_id)
        self._api = api

    def _handle(self, pid: int) -> CommandHandle:
        return CommandHandle(self._api, self._sandbox, pid)

    def run(
        self,
        cmd: Cmd,
        background: bool = False,
        envs: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = 60,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        stdin: bool = False,
    ) -> Union[CommandResult, CommandHandle]:
        """Runs ``cmd`` (a string through ``sh -c``, or an argv). In the foreground: its
        result, output passed to the callbacks as it comes; :class:`CommandExitException` on
        a non-zero exit, :class:`TimeoutException` past ``timeout`` seconds (``0`` or
        ``None``: no limit). In the background: a :class:`CommandHandle` at once."""
        return self._api.run(
            self._run_op(cmd, background, envs, cwd, user, timeout, on_stdout, on_stderr, stdin)
        )

    def list(self) -> List[ProcessInfo]:
        """The commands started through the API, running and recently ended."""
        return self._api.run(self._list_op())

    def connect(self, pid: int) -> CommandHandle:
        """A handle on the command ``pid`` (started in the background)."""
        return self._handle(pid)

    def kill(self, pid: int) -> bool:
        """Kills the command ``pid``; ``False`` if it had ended."""
        return self._handle(pid).kill()

    def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        """Writes to the standard input of the command ``pid``."""
        self._handle(pid).send_stdin(data)

    def close_stdin(self, pid: int) -> None:
        """Closes the standard input of the command ``pid``."""
        self._handle(pid).close_stdin()


class AsyncCommands(_CommandsOps[AsyncCommandHandle]):
    """``sandbox.commands`` of an :class:`~mvm.AsyncSandbox`."""

    def __init__(self, api: AsyncApi, sandbox_id: str):
        super().__init__(sandbox_id)
        self._api = api

    def _handle(self, pid: int) -> AsyncCommandHandle:
        return AsyncCommandHandle(self._api, self._sandbox, pid)

    async def run(
        self,
        cmd: Cmd,
        background: bool = False,
        envs: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = 60,
        on_stdout: Optional[AsyncOutputCallback] = None,
        on_stderr: Optional[AsyncOutputCallback] = None,
        stdin: bool = False,
    ) -> Union[CommandResult, AsyncCommandHandle]:
        """Runs ``cmd`` (a string through ``sh -c``, or an argv). In the foreground: its
        result, output passed to the callbacks (functions or coroutine functions) as it
        comes; :class:`CommandExitException` on a non-zero exit, :class:`TimeoutException`
        past ``timeout`` seconds (``0`` or ``None``: no limit). In the background: an
        :class:`AsyncCommandHandle` at once."""
        return await self._api.run(
            self._run_op(cmd, background, envs, cwd, user, timeout, on_stdout, on_stderr, stdin)
        )

    async def list(self) -> List[ProcessInfo]:
        """The commands started through the API, running and recently ended."""
        return await self._api.run(self._list_op())

    async def connect(self, pid: int) -> AsyncCommandHandle:
        """A handle on the command ``pid`` (started in the background)."""
        return self._handle(pid)

    async def kill(self, pid: int) -> bool:
        """Kills the command ``pid``; ``False`` if it had ended."""
        return await self._handle(pid).kill()

    async def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        """Writes to the standard input of the command ``pid``."""
        await self._handle(pid).send_stdin(data)

    async def close_stdin(self, pid: int) -> None:
        """Closes the standard input of the command ``pid``."""
        await self._handle(pid).close_stdin()


__all__ = [
    "CommandResult",
    "CommandHandle",
    "AsyncCommandHandle",
    "Commands",
    "AsyncCommands",
    "CommandEvents",
    "ProcessInfo",
    "argv_of",
]
