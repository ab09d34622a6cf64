"""E2B's names and defaults over mvm: code written for the ``e2b`` package runs on mvm after
its import line changes to ``from mvm.compat.e2b import Sandbox, …`` (``AsyncSandbox`` for
E2B's async one, with the same defaults).

What differs, because mvm's security model does not widen:

- ``Sandbox.create(template)`` takes an E2B template name, which the host maps to a
  digest-pinned image (``[e2b.templates]`` in ``$MVM_HOME/config.toml``); ``base`` when none.
- A sandbox has no network unless granted: ``allow_internet_access=True`` (open internet) is
  refused; grant hosts with ``allow_hosts=[…]`` instead.
- ``api_key``, ``domain`` and ``request_timeout`` are accepted and unused (there is no cloud).
- String commands run through ``/bin/bash -l -c`` as in E2B when the image has bash, else
  ``sh -c``.
- Where the image gives the workload user E2B's home (``/home/user``), commands start there
  with ``HOME`` set and relative file paths are resolved in it, as in E2B; elsewhere files
  stay under ``/tmp`` and a relative path is refused. Commands run as the workload user, never
  root (``user="root"`` is refused, ``AGENT114``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._api import Api, AsyncApi, Op
from ..commands import (
    AsyncCommandHandle,
    Cmd,
    CommandHandle,
    CommandResult,
    ProcessInfo,
    _CommandsOps,
)
from ..commands import AsyncCommands as _AsyncCommands
from ..commands import Commands as _Commands
from ..exceptions import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)
from ..files import AsyncFiles as _AsyncFiles
from ..files import EntryInfo, WriteEntry, WriteInfo, _FilesOps
from ..files import Files as _Files
from ..sandbox import AsyncSandbox as _AsyncSandbox
from ..sandbox import Sandbox as _Sandbox
from ..sandbox import SandboxInfo

#: The template E2B's ``Sandbox.create()`` uses without one.
DEFAULT_TEMPLATE = "base"
#: E2B's sandbox lifetime when none is given, in seconds.
DEFAULT_TIMEOUT = 300

#: The home of E2B's user.
E2B_HOME = "/home/user"
#: The agent's code for a path outside the roots it serves.
_PATH_REFUSED = "AGENT107"

_BASH = ("/bin/bash", "-l", "-c")
_SH = ("sh", "-c")


class _Workspace:
    """What E2B code takes for granted in a sandbox, looked up once: bash, and E2B's home when
    the image gives it to the workload user (the agent serves files there only then)."""

    def __init__(self, sandbox_id: str):
        self._commands: _CommandsOps[Any] = _CommandsOps(sandbox_id)
        self._files = _FilesOps(sandbox_id)
        self.bash: Optional[bool] = None
        self.home: Optional[str] = None

    def found_op(self) -> Op["_Workspace"]:
        if self.bash is None:
            probe = ["sh", "-c", "command -v bash >/dev/null 2>&1 && echo yes || true"]
            found = yield from self._commands._foreground_op(
                {"argv": probe, "timeout_s": 60}, None, None
            )
            try:
                home = yield from self._files._get_info_op(E2B_HOME)
                self.home = E2B_HOME if home.type == "directory" else None
            except SandboxException as e:
                if e.code != _PATH_REFUSED:
                    raise
            self.bash = found.stdout.strip() == "yes"
        return self


class _E2BCommands(_CommandsOps[Any]):
    """E2B's ways for commands: bash as a login shell where the image has it, and its home as
    the working directory and ``HOME`` where the image has that."""

    _workspace: _Workspace

    def _shell_op(self) -> Op[Sequence[str]]:
        found = yield from self._workspace.found_op()
        return _BASH if found.bash else _SH

    def _run_op(
        self,
        cmd: Cmd,
        background: bool,
        envs: Optional[Dict[str, str]],
        cwd: Optional[str],
        user: Optional[str],
        timeout: Optional[float],
        on_stdout: Optional[Callable[[str], object]],
        on_stderr: Optional[Callable[[str], object]],
        stdin: bool,
    ) -> Op[Any]:
        home = (yield from self._workspace.found_op()).home
        if home is not None:
            cwd = home if cwd is None else cwd
            envs = {"HOME": home, **(envs or {})}
        return (
            yield from super()._run_op(
                cmd, background, envs, cwd, user, timeout, on_stdout, on_stderr, stdin
            )
        )


class _E2BFiles(_FilesOps):
    """E2B's paths: a relative one is in the user's home."""

    _workspace: _Workspace

    def _where_op(self, path: str) -> Op[str]:
        if path.startswith("/"):
            return path
        home = (yield from self._workspace.found_op()).home
        if home is None:
            raise InvalidArgumentException(
                f"{path}: a relative path needs E2B's home ({E2B_HOME}), which this image does "
                "not give the workload user; use a path under /tmp",
                code="API001",
            )
        return f"{home}/{path}"


class Commands(_E2BCommands, _Commands):
    """``sandbox.commands`` with E2B's shell and home."""

    def __init__(self, api: Api, sandbox_id: str, workspace: _Workspace):
        super().__init__(api, sandbox_id)
        self._workspace = workspace

    @property
    def shell(self) -> Sequence[str]:  # type: ignore[override]
        return self._api.run(self._shell_op())


class AsyncCommands(_E2BCommands, _AsyncCommands):
    """``sandbox.commands`` of an :class:`AsyncSandbox`, with E2B's shell and home."""

    def __init__(self, api: AsyncApi, sandbox_id: str, workspace: _Workspace):
        super().__init__(api, sandbox_id)
        self._workspace = workspace


class Files(_E2BFiles, _Files):
    """``sandbox.files`` with relative paths in E2B's home."""

    def __init__(self, api: Api, sandbox_id: str, workspace: _Workspace):
        super().__init__(api, sandbox_id)
        self._workspace = workspace


class AsyncFiles(_E2BFiles, _AsyncFiles):
    """``sandbox.files`` of an :class:`AsyncSandbox`, with relative paths in E2B's home."""

    def __init__(self, api: AsyncApi, sandbox_id: str, workspace: _Workspace):
        super().__init__(api, sandbox_id)
        self._workspace = workspace


def _e2b_create(
    template: Optional[str], timeout: Optional[int], allow_internet_access: Optional[bool]
) -> Dict[str, Any]:
    """E2B's defaults for ``create``, and its open internet refused."""
    if allow_internet_access:
        raise InvalidArgumentException(
            "mvm sandboxes reach no network unless granted: open internet access is not "
            "given; grant what the code needs with allow_hosts=['api.example.com', …]",
            code="API001",
        )
    return {"template": template or DEFAULT_TEMPLATE, "timeout": timeout or DEFAULT_TIMEOUT}


class Sandbox(_Sandbox):
    """E2B's ``Sandbox`` on mvm."""

    def _parts(self) -> Tuple[Commands, Files]:  # type: ignore[override]
        workspace = _Workspace(self.sandbox_id)
        return (
            Commands(self._api, self.sandbox_id, workspace),
            Files(self._api, self.sandbox_id, workspace),
        )

    @classmethod
    def create(  # type: ignore[override]
        cls,
        template: Optional[str] = None,
        timeout: Optional[int] = None,
        metadata: Optional[Dict[str, str]] = None,
        envs: Optional[Dict[str, str]] = None,
        api_key: Optional[str] = None,
        domain: Optional[str] = None,
        request_timeout: Optional[float] = None,
        allow_internet_access: Optional[bool] = None,
        allow_hosts: Optional[List[str]] = None,
        **_: object,
    ) -> "Sandbox":
        """A ready sandbox of ``template`` (``base`` when none), removed after ``timeout``
        seconds (300 when none)."""
        e2b = _e2b_create(template, timeout, allow_internet_access)
        return super().create(**e2b, metadata=metadata, envs=envs, allow_hosts=allow_hosts)


class AsyncSandbox(_AsyncSandbox):
    """E2B's ``AsyncSandbox`` on mvm."""

    def _parts(self) -> Tuple[AsyncCommands, AsyncFiles]:  # type: ignore[override]
        workspace = _Workspace(self.sandbox_id)
        return (
            AsyncCommands(self._api, self.sandbox_id, workspace),
            AsyncFiles(self._api, self.sandbox_id, workspace),
        )

    @classmethod
    async def create(  # type: ignore[override]
        cls,
        template: Optional[str] = None,
        timeout: Optional[int] = None,
        metadata: Optional[Dict[str, str]] = None,
        envs: Optional[Dict[str, str]] = None,
        api_key: Optional[str] = None,
        domain: Optional[str] = None,
        request_timeout: Optional[float] = None,
        allow_internet_access: Optional[bool] = None,
        allow_hosts: Optional[List[str]] = None,
        **_: object,
    ) -> "AsyncSandbox":
        """A ready sandbox of ``template`` (``base`` when none), removed after ``timeout``
        seconds (300 when none)."""
        e2b = _e2b_create(template, timeout, allow_internet_access)
        return await super().create(**e2b, metadata=metadata, envs=envs, allow_hosts=allow_hosts)


__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "SandboxInfo",
    "CommandHandle",
    "AsyncCommandHandle",
    "CommandResult",
    "ProcessInfo",
    "EntryInfo",
    "WriteEntry",
    "WriteInfo",
    "SandboxException",
    "InvalidArgumentException",
    "NotFoundException",
    "TimeoutException",
    "CommandExitException",
]
