"""mvm: sandboxes — microVMs with verified roots, no network unless granted, and a signed
receipt for every command — driven from Python over mvm's local API."""

from .commands import CommandHandle, CommandResult, ProcessInfo
from .exceptions import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)
from .files import EntryInfo, WriteEntry, WriteInfo
from .sandbox import Sandbox, SandboxInfo

__all__ = [
    "Sandbox",
    "SandboxInfo",
    "CommandHandle",
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
