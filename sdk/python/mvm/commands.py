"""Commands in a sandbox: run to completion, or in the background with a handle."""

from __future__ import annotations

import base64
import codecs
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Dict, Generator, Iterator, List, Optional, Sequence, Union

from ._api import Api
from .exceptions import CommandExitException, SandboxException, TimeoutException, error_for

OutputCallback = Callable[[str], None]
Cmd = Union[str, Sequence[str]]


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


class _Collector:
    """Decodes output events as they come (UTF-8, across event boundaries) into callbacks
    and the collected text."""

    def __init__(self, on_stdout: Optional[OutputCallback], on_stderr: Optional[OutputCallback]):
        self.on = {"stdout": on_stdout, "stderr": on_stderr}
        self.text: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        self.decoders = {
            kind: codecs.getincrementaldecoder("utf-8")(errors="replace") for kind in self.text
        }

    def output(self, kind: str, data: str) -> None:
        text = self.decoders[kind].decode(base64.b64decode(data))
        self._add(kind, text)

    def _add(self, kind: str, text: str) -> None:
        if text:
            self.text[kind].append(text)
            callback = self.on[kind]
            if callback is not None:
                callback(text)

    def result(self, end: dict) -> CommandResult:
        for kind, decoder in self.decoders.items():
            self._add(kind, decoder.decode(b"", final=True))
        return CommandResult(
            stdout="".join(self.text["stdout"]),
            stderr="".join(self.text["stderr"]),
            exit_code=end["exit_code"],
            error="timed out" if end.get("timed_out") else None,
            duration_ms=end.get("duration_ms", 0),
            receipt=end.get("receipt", ""),
            signal=end.get("signal"),
            timed_out=bool(end.get("timed_out")),
        )


def _follow(
    events: Generator[dict, None, None],
    on_stdout: Optional[OutputCallback],
    on_stderr: Optional[OutputCallback],
) -> CommandResult:
    """Reads events to the end: the result, or the exception for how it ended."""
    # Closed however it ends: a stream left to the garbage collector would be closed inside
    # whatever request happens to be running then, under the connection pool's lock.
    with closing(events):
        return _read_events(events, _Collector(on_stdout, on_stderr))


def _read_events(events: Iterator[dict], collector: "_Collector") -> CommandResult:
    for event in events:
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            collector.output(kind, event["data"])
        elif kind == "ended":
            result = collector.result(event)
            if result.timed_out:
                raise TimeoutException(
                    "the command ran past its timeout and was killed", code="TIMEOUT"
                )
            if result.exit_code != 0:
                raise CommandExitException(result)
            return result
        elif kind == "error":
            raise error_for(event.get("code", "API006"), event.get("message", ""))
    raise SandboxException("the command's event stream ended before the command", "API006")


def argv_of(cmd: Sequence[str]) -> List[str]:
    """A command given as an argv, checked."""
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("cmd is a string, or a non-empty sequence of strings")
    return argv


class CommandHandle:
    """A command running in the background."""

    def __init__(self, api: Api, sandbox_id: str, pid: int):
        self._api = api
        self._sandbox = sandbox_id
        self.pid = pid

    def _path(self, tail: str = "") -> str:
        return f"/v1/sandboxes/{self._sandbox}/commands/{self.pid}{tail}"

    def wait(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> CommandResult:
        """Waits for its end (its output so far first); raises
        :class:`CommandExitException` on a non-zero exit."""
        events = self._api.stream_lines("GET", self._path("/events"))
        return _follow(events, on_stdout, on_stderr)

    def kill(self) -> bool:
        """Kills it (SIGKILL); ``False`` if it had ended already."""
        return self.send_signal(9)

    def send_signal(self, signal: int) -> bool:
        """Sends ``signal``; ``False`` if it had ended already."""
        try:
            self._api.request("POST", self._path("/signal"), json={"signal": signal})
            return True
        except SandboxException as e:
            if e.status == 404:
                return False
            raise

    def send_stdin(self, data: Union[str, bytes]) -> None:
        """Writes to its standard input (it must have been started with ``stdin=True``)."""
        body = data.encode() if isinstance(data, str) else data
        self._api.request("POST", self._path("/stdin"), content=body)

    def close_stdin(self) -> None:
        """Closes its standard input: it reads end of file."""
        self._api.request("DELETE", self._path("/stdin"))


class Commands:
    """``sandbox.commands``."""

    #: How a string command is run.
    shell: Sequence[str] = ("sh", "-c")

    def __init__(self, api: Api, sandbox_id: str):
        self._api = api
        self._sandbox = sandbox_id

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
        # A string goes through the shell (only then is `shell` looked at); a list is the argv.
        argv = [*self.shell, cmd] if isinstance(cmd, str) else argv_of(cmd)
        spec: dict = {"argv": argv, "background": background, "stdin": stdin}
        if envs:
            spec["envs"] = dict(envs)
        if cwd is not None:
            spec["cwd"] = cwd
        if user is not None:
            spec["user"] = user
        spec["timeout_s"] = int(timeout) if timeout else 0
        path = f"/v1/sandboxes/{self._sandbox}/commands"
        if background:
            started = self._api.json("POST", path, json=spec)
            return CommandHandle(self._api, self._sandbox, started["id"])
        events = self._api.stream_lines("POST", path, json=spec)
        return _follow(events, on_stdout, on_stderr)

    def list(self) -> List[ProcessInfo]:
        """The commands started through the API, running and recently ended."""
        listed = self._api.json("GET", f"/v1/sandboxes/{self._sandbox}/commands")
        return [
            ProcessInfo(
                pid=c["id"],
                cmd=c["argv"],
                running=c["running"],
                exit_code=(c.get("end") or {}).get("exit_code"),
            )
            for c in listed["commands"]
        ]

    def connect(self, pid: int) -> CommandHandle:
        """A handle on the command ``pid`` (started in the background)."""
        return CommandHandle(self._api, self._sandbox, pid)

    def kill(self, pid: int) -> bool:
        """Kills the command ``pid``; ``False`` if it had ended."""
        return self.connect(pid).kill()

    def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        """Writes to the standard input of the command ``pid``."""
        self.connect(pid).send_stdin(data)

    def close_stdin(self, pid: int) -> None:
        """Closes the standard input of the command ``pid``."""
        self.connect(pid).close_stdin()


__all__ = ["CommandResult", "CommandHandle", "Commands", "ProcessInfo", "argv_of"]
