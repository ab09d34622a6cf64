"""Sandboxes: mvm microVMs made and driven from Python."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ._api import Api, shared
from .commands import Commands
from .exceptions import NotFoundException
from .files import Files

#: How long a sandbox lives unless told otherwise, in seconds.
DEFAULT_TIMEOUT = 300


@dataclass
class SandboxInfo:
    """A sandbox as the server describes it."""

    sandbox_id: str
    state: str
    vm: str
    plan_digest: str
    started_at: str
    metadata: Dict[str, str] = field(default_factory=dict)
    expires_at: Optional[str] = None
    reason: Optional[str] = None


def _info(raw: dict) -> SandboxInfo:
    return SandboxInfo(
        sandbox_id=raw["id"],
        state=raw["state"],
        vm=raw["vm"],
        plan_digest=raw["plan_digest"],
        started_at=raw["started_at"],
        metadata=raw.get("metadata") or {},
        expires_at=raw.get("expires_at"),
        reason=raw.get("reason"),
    )


class Sandbox:
    """A sandbox: a named mvm microVM with a verified root, no network unless granted, and
    a signed receipt for every command. Use it as a context manager to kill it at the end."""

    #: The class of ``commands`` (the E2B compatibility layer runs strings through bash).
    _commands_class = Commands

    def __init__(self, sandbox_id: str, api: Optional[Api] = None):
        self._api = api or shared()
        self.sandbox_id = sandbox_id
        self.commands = self._commands_class(self._api, sandbox_id)
        self.files = Files(self._api, sandbox_id)

    @property
    def id(self) -> str:
        return self.sandbox_id

    @classmethod
    def create(
        cls,
        image: Optional[str] = None,
        *,
        plan: Optional[str] = None,
        template: Optional[str] = None,
        timeout: Optional[int] = DEFAULT_TIMEOUT,
        envs: Optional[Dict[str, str]] = None,
        metadata: Optional[Dict[str, str]] = None,
        cpus: Optional[int] = None,
        memory_mb: Optional[int] = None,
        allow_hosts: Optional[List[str]] = None,
        sandbox_id: Optional[str] = None,
        api: Optional[Api] = None,
    ) -> "Sandbox":
        """Creates a sandbox from ``image`` (``REFERENCE@sha256:…``, built into a signed
        bundle on first use), a signed ``plan`` file or a ``template`` the host maps to a pinned
        image (``[e2b.templates]``), and returns once it is ready. It is
        removed ``timeout`` seconds later (``0``/``None``: never) unless extended with
        :meth:`set_timeout`. ``allow_hosts`` grants egress (``HOST[:PORT]``); none by
        default."""
        spec: dict = {"timeout_s": int(timeout) if timeout else 0}
        if image is not None:
            spec["image"] = image
        if plan is not None:
            spec["plan"] = os.path.abspath(plan)
        for key, value in (
            ("template", template),
            ("envs", envs),
            ("metadata", metadata),
            ("cpus", cpus),
            ("memory_mib", memory_mb),
            ("allow_hosts", allow_hosts),
            ("id", sandbox_id),
        ):
            if value:
                spec[key] = value
        api = api or shared()
        created = api.json("POST", "/v1/sandboxes", json=spec)
        return cls(created["id"], api)

    @classmethod
    def connect(cls, sandbox_id: str, api: Optional[Api] = None) -> "Sandbox":
        """The sandbox ``sandbox_id``; a paused or cold one is resumed."""
        api = api or shared()
        info = _info(api.json("GET", f"/v1/sandboxes/{sandbox_id}"))
        if info.state in ("paused", "cold"):
            api.json("POST", f"/v1/sandboxes/{sandbox_id}/resume")
        return cls(sandbox_id, api)

    @staticmethod
    def list(
        metadata: Optional[Dict[str, str]] = None,
        state: Optional[str] = None,
        api: Optional[Api] = None,
    ) -> List[SandboxInfo]:
        """Sandboxes (every named VM), those with all of ``metadata``'s labels and in
        ``state`` when given."""
        params = [("label", f"{k}={v}") for k, v in (metadata or {}).items()]
        if state:
            params.append(("state", state))
        listed = (api or shared()).json("GET", "/v1/sandboxes", params=params)
        return [_info(raw) for raw in listed["sandboxes"]]

    def get_info(self) -> SandboxInfo:
        """What the server knows of it now."""
        return _info(self._api.json("GET", f"/v1/sandboxes/{self.sandbox_id}"))

    def is_running(self) -> bool:
        """Whether it runs (not paused, cold or ended)."""
        try:
            return self.get_info().state == "running"
        except NotFoundException:
            return False

    def kill(self) -> bool:
        """Stops and removes it; ``False`` if it was gone already."""
        try:
            self._api.request("DELETE", f"/v1/sandboxes/{self.sandbox_id}")
            return True
        except NotFoundException:
            return False

    def pause(self, cold: bool = False) -> str:
        """Pauses it (``cold``: saved to disk, holding no memory, its clock stopped);
        returns its id for :meth:`connect`."""
        self._api.json("POST", f"/v1/sandboxes/{self.sandbox_id}/pause", json={"cold": cold})
        return self.sandbox_id

    def resume(self) -> None:
        """Lets it run again (from paused or cold)."""
        self._api.json("POST", f"/v1/sandboxes/{self.sandbox_id}/resume")

    def set_timeout(self, timeout: int) -> None:
        """It is removed ``timeout`` seconds from now (``0``: never)."""
        self._api.json(
            "POST", f"/v1/sandboxes/{self.sandbox_id}/timeout", json={"timeout_s": int(timeout)}
        )

    def receipt(self, receipt_id: str) -> dict:
        """A command's signed run receipt (a DSSE envelope; ``mvm receipt verify`` checks
        it)."""
        return self._api.json("GET", f"/v1/receipts/{receipt_id}")

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Sandbox({self.sandbox_id!r})"


__all__ = ["Sandbox", "SandboxInfo", "DEFAULT_TIMEOUT"]
