"""Terminals in a sandbox (``sandbox.pty``): a command on a pseudo-terminal in the guest —
a shell by default — whose output comes as raw bytes, whose input is keys, and whose size
can change while it runs. Only where the sandbox's plan grants a terminal (the ``dev``
profile, or ``terminal`` in the IR); elsewhere the handle's :meth:`PtyHandle.wait` raises
with ``AGENT120``."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, List, Optional, Union

from ._api import Api, AsyncApi, Call, Op, Output
from .commands import (
    AsyncCommandHandle,
    Cmd,
    CommandEvents,
    CommandHandle,
    CommandResult,
    _HandleOps,
    argv_of,
)

#: Called with what the terminal printed, as raw bytes (a key sequence or a UTF-8
#: character may be split across calls).
PtyCallback = Callable[[bytes], None]
#: For :class:`AsyncPty`: a function or a coroutine function (awaited, in order).
AsyncPtyCallback = Callable[[bytes], Optional[Awaitable[object]]]

#: What a terminal runs when no ``cmd`` is given: the best shell the image has, as a login
#: shell (as ``mvm shell`` does).
SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash -l; exec sh -l"]


@dataclass(frozen=True)
class PtySize:
    """A terminal's size: 1-4096 rows and columns."""

    rows: int = 24
    cols: int = 80

    def json(self) -> Dict[str, int]:
        return {"rows": self.rows, "cols": self.cols}


class PtyEvents(CommandEvents):
    """A terminal command's event stream: its output (one stream, as ``stdout`` events) goes
    to ``on_pty`` as the bytes it is; the result's ``stdout`` is it all, decoded."""

    def __init__(self, on_pty: Optional[Callable[[bytes], object]] = None):
        super().__init__()
        self._on_pty = on_pty

    def _event(self, event: dict) -> List[Output]:
        told = super()._event(event)
        if event.get("type") == "stdout" and self._on_pty is not None:
            return [(self._on_pty, base64.b64decode(event["data"]))]
        return told


class _PtyHandleOps(_HandleOps):
    """What :class:`PtyHandle` and :class:`AsyncPtyHandle` add to a command's handle."""

    def _wait_pty_op(self, on_pty: Optional[Callable[[bytes], object]]) -> Op[CommandResult]:
        result: CommandResult = yield Call("GET", self._path("/events"), follow=PtyEvents(on_pty))
        return result

    def _resize_op(self, size: PtySize) -> Op[None]:
        yield Call("POST", self._path("/resize"), json=size.json())


class PtyHandle(_PtyHandleOps, CommandHandle):
    """A command running on a terminal: :meth:`send_stdin` types, :meth:`resize` resizes,
    :meth:`wait` follows its output to its end."""

    def wait(  # type: ignore[override]
        self, on_pty: Optional[PtyCallback] = None
    ) -> CommandResult:
        """Waits for its end, its output (from its start) passed to ``on_pty`` as bytes;
        raises :class:`~mvm.CommandExitException` on a non-zero exit, and the refusal (its
        code) when it could not start."""
        return self._api.run(self._wait_pty_op(on_pty))

    def resize(self, size: PtySize) -> None:
        """Resizes its terminal (the command gets ``SIGWINCH``)."""
        self._api.run(self._resize_op(size))


class AsyncPtyHandle(_PtyHandleOps, AsyncCommandHandle):
    """A command running on a terminal, for :class:`~mvm.AsyncSandbox`."""

    async def wait(  # type: ignore[override]
        self, on_pty: Optional[AsyncPtyCallback] = None
    ) -> CommandResult:
        """Waits for its end, its output passed to ``on_pty`` (a function or a coroutine
        function) as bytes; raises as :meth:`PtyHandle.wait`."""
        return await self._api.run(self._wait_pty_op(on_pty))

    async def resize(self, size: PtySize) -> None:
        """Resizes its terminal."""
        await self._api.run(self._resize_op(size))


class _PtyOps:
    """What :class:`Pty` and :class:`AsyncPty` do, as ops."""

    def __init__(self, sandbox_id: str):
        self._sandbox = sandbox_id
        self._path = f"/v1/sandboxes/{sandbox_id}/commands"

    def _create_op(
        self,
        size: PtySize,
        cmd: Optional[Cmd],
        envs: Optional[Dict[str, str]],
        cwd: Optional[str],
        user: Optional[str],
        timeout: Optional[float],
    ) -> Op[int]:
        if cmd is None:
            argv = list(SHELL)
        elif isinstance(cmd, str):
            argv = ["sh", "-c", cmd]
        else:
            argv = argv_of(cmd)
        spec: dict = {"argv": argv, "background": True, "pty": size.json()}
        if envs:
            spec["envs"] = dict(envs)
        if cwd is not None:
            spec["cwd"] = cwd
        if user is not None:
            spec["user"] = user
        spec["timeout_s"] = int(timeout) if timeout else 0
        started = yield Call("POST", self._path, json=spec)
        return int(started["id"])


class Pty(_PtyOps):
    """``sandbox.pty``."""

    def __init__(self, api: Api, sandbox_id: str):
        super().__init__(sandbox_id)
        self._api = api

    def create(
        self,
        size: PtySize = PtySize(),
        cmd: Optional[Cmd] = None,
        envs: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = 0,
    ) -> PtyHandle:
        """Starts ``cmd`` (a login shell when ``None``; a string through ``sh -c``, or an
        argv) on a terminal of ``size``, ``TERM=xterm-256color`` unless ``envs`` sets it,
        and returns its handle at once. ``timeout`` seconds before it is killed (``0`` or
        ``None``: the longest the agent allows)."""
        pid = self._api.run(self._create_op(size, cmd, envs, cwd, user, timeout))
        return self.connect(pid)

    def connect(self, pid: int) -> PtyHandle:
        """A handle on the terminal command ``pid``."""
        return PtyHandle(self._api, self._sandbox, pid)

    def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        """Types ``data`` on the terminal of ``pid``."""
        self.connect(pid).send_stdin(data)

    def resize(self, pid: int, size: PtySize) -> None:
        """Resizes the terminal of ``pid``."""
        self.connect(pid).resize(size)

    def kill(self, pid: int) -> bool:
        """Kills ``pid``; ``False`` if it had ended."""
        return self.connect(pid).kill()


class AsyncPty(_PtyOps):
    """``sandbox.pty`` of an :class:`~mvm.AsyncSandbox`."""

    def __init__(self, api: AsyncApi, sandbox_id: str):
        super().__init__(sandbox_id)
        self._api = api

    async def create(
        self,
        size: PtySize = PtySize(),
        cmd: Optional[Cmd] = None,
        envs: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = 0,
    ) -> AsyncPtyHandle:
        """Starts ``cmd`` on a terminal, as :meth:`Pty.create`."""
        pid = await self._api.run(self._create_op(size, cmd, envs, cwd, user, timeout))
        return self.connect(pid)

    def connect(self, pid: int) -> AsyncPtyHandle:
        """A handle on the terminal command ``pid``."""
        return AsyncPtyHandle(self._api, self._sandbox, pid)

    async def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        """Types ``data`` on the terminal of ``pid``."""
        await self.connect(pid).send_stdin(data)

    async def resize(self, pid: int, size: PtySize) -> None:
        """Resizes the terminal of ``pid``."""
        await self.connect(pid).resize(size)

    async def kill(self, pid: int) -> bool:
        """Kills ``pid``; ``False`` if it had ended."""
        return await self.connect(pid).kill()


__all__ = [
    "PtySize",
    "Pty",
    "AsyncPty",
    "PtyHandle",
    "AsyncPtyHandle",
    "PtyEvents",
]
