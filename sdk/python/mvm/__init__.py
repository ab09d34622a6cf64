"""mvm: sandboxes — microVMs with verified roots, no network unless granted, and a signed
receipt for every command — driven from Python over mvm's local API, in sync code
(:class:`Sandbox`) or with asyncio (:class:`AsyncSandbox`)."""

from .commands import AsyncCommandHandle, CommandHandle, CommandResult, ProcessInfo
from .exceptions import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)
from .files import EntryInfo, WriteEntry, WriteInfo
from .pty import AsyncPtyHandle, PtyHandle, PtySize
from .sandbox import AsyncSandbox, Sandbox, SandboxInfo

__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "SandboxInfo",
    "CommandHandle",
    "AsyncCommandHandle",
    "CommandResult",
    "ProcessInfo",
    "PtySize",
    "PtyHandle",
    "AsyncPtyHandle",
    "EntryInfo",
    "WriteEntry",
    "WriteInfo",
    "SandboxException",
    "InvalidArgumentException",
    "NotFoundException",
    "TimeoutException",
    "CommandExitException",
]
