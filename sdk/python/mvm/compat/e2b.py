"""E2B's names and defaults over mvm: code written for the ``e2b`` package runs on mvm after
its import line changes to ``from mvm.compat.e2b import Sandbox, …``.

What differs, because mvm's security model does not widen:

- ``Sandbox.create(template)`` takes an E2B template name, which the host maps to a
  digest-pinned image (``[e2b.templates]`` in ``$MVM_HOME/config.toml``); ``base`` when none.
- A sandbox has no network unless granted: ``allow_internet_access=True`` (open internet) is
  refused; grant hosts with ``allow_hosts=[…]`` instead.
- ``api_key``, ``domain`` and ``request_timeout`` are accepted and unused (there is no cloud).
- String commands run through ``/bin/bash -l -c`` as in E2B when the image has bash, else
  ``sh -c``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..commands import (
    CommandHandle,
    CommandResult,
    Commands as _Commands,
    ProcessInfo,
)
from ..exceptions import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)
from ..files import EntryInfo, WriteEntry, WriteInfo
from ..sandbox import Sandbox as _Sandbox
from ..sandbox import SandboxInfo

#: The template E2B's ``Sandbox.create()`` uses without one.
DEFAULT_TEMPLATE = "base"


class Commands(_Commands):
    """``sandbox.commands`` with E2B's shell: bash as a login shell where the image has it."""

    _bash: Optional[bool] = None

    @property  # type: ignore[override]
    def shell(self) -> Sequence[str]:
        if self._bash is None:
            probe = _Commands.run(
                self, ["sh", "-c", "command -v bash >/dev/null 2>&1 && echo yes || true"]
            )
            self._bash = probe.stdout.strip() == "yes"
        return ("/bin/bash", "-l", "-c") if self._bash else ("sh", "-c")


class Sandbox(_Sandbox):
    """E2B's ``Sandbox`` on mvm."""

    _commands_class = Commands

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
        if allow_internet_access:
            raise InvalidArgumentException(
                "mvm sandboxes reach no network unless granted: open internet access is not "
                "given; grant what the code needs with allow_hosts=['api.example.com', …]",
                code="API001",
            )
        return super().create(
            template=template or DEFAULT_TEMPLATE,
            timeout=timeout or 300,
            metadata=metadata,
            envs=envs,
            allow_hosts=allow_hosts,
        )


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
