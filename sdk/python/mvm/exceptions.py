"""Errors raised by the SDK. Each carries mvm's stable code (``docs/errors.md``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Type

if TYPE_CHECKING:  # pragma: no cover
    from .commands import CommandResult


class SandboxException(Exception):
    """Anything mvm refused or failed to do; ``code`` is its stable code."""

    def __init__(self, message: str, code: str = "API006", status: Optional[int] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class InvalidArgumentException(SandboxException):
    """The request was not one mvm takes (a bad argument, a refused path or user)."""


class NotFoundException(SandboxException):
    """No such sandbox, command, file or receipt."""


class TimeoutException(SandboxException):
    """A command ran past its timeout and was killed, or a wait ran out."""


class CommandExitException(SandboxException):
    """A command exited with a status other than 0; its result is in ``result``."""

    def __init__(self, result: "CommandResult"):
        super().__init__(
            f"the command exited with status {result.exit_code}", code="EXIT", status=None
        )
        self.result = result
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exit_code = result.exit_code
        self.error = result.error


def from_answer(status: int, body: dict) -> SandboxException:
    """The exception for an error answer of the API."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    code = error.get("code", "API006")
    message = error.get("message", f"HTTP {status}")
    return error_for(code, message, status)


def error_for(code: str, message: str, status: Optional[int] = None) -> SandboxException:
    """The exception class that fits ``code`` and the HTTP ``status``."""
    kind: Type[SandboxException]
    if status == 404 or code in ("API005", "RUN036") and "no VM" in message:
        kind = NotFoundException
    elif code == "AGENT112" and "No such file" in message:
        kind = NotFoundException
    elif status in (400, 413, 422) or code.startswith("AGENT1"):
        kind = InvalidArgumentException
    else:
        kind = SandboxException
    return kind(message, code=code, status=status)
