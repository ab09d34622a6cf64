"""Sandboxes: mvm microVMs made and driven from Python."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type, TypeVar

from ._api import Api, AsyncApi, Call, Op, shared, shared_async
from .commands import AsyncCommands, Commands
from .exceptions import NotFoundException
from .files import AsyncFiles, Files
from .pty import AsyncPty, Pty

#: How long a sandbox lives unless told otherwise, in seconds.
DEFAULT_TIMEOUT = 300

S = TypeVar("S", bound="Sandbox")
A = TypeVar("A", bound="AsyncSandbox")


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
    #: The boot snapshot its guest was restored from; ``None`` when it booted.
    boot_snapshot: Optional[str] = None


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
        boot_snapshot=raw.get("boot_snapshot"),
    )


def _path(sandbox_id: str, tail: str = "") -> str:
    return f"/v1/sandboxes/{sandbox_id}{tail}"


class _SandboxOps:
    """What :class:`Sandbox` and :class:`AsyncSandbox` do, as ops."""

    def __init__(self, sandbox_id: str):
        self.sandbox_id = sandbox_id

    @property
    def id(self) -> str:
        return self.sandbox_id

    @staticmethod
    def _create_op(
        image: Optional[str],
        plan: Optional[str],
        template: Optional[str],
        timeout: Optional[int],
        envs: Optional[Dict[str, str]],
        metadata: Optional[Dict[str, str]],
        cpus: Optional[int],
        memory_mb: Optional[int],
        allow_hosts: Optional[List[str]],
        sandbox_id: Optional[str],
        secrets: Optional[List[str]],
        profile: Optional[str],
        cold_boot: bool,
        volumes: Optional[List[str]] = None,
    ) -> Op[str]:
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
            ("secrets", secrets),
            ("profile", profile),
            ("cold_boot", cold_boot),
            ("volumes", volumes),
        ):
            if value:
                spec[key] = value
        created = yield Call("POST", "/v1/sandboxes", json=spec)
        return str(created["id"])

    @staticmethod
    def _connect_op(sandbox_id: str) -> Op[str]:
        info = _info((yield Call("GET", _path(sandbox_id))))
        if info.state in ("paused", "cold"):
            yield Call("POST", _path(sandbox_id, "/resume"))
        return sandbox_id

    @staticmethod
    def _list_op(metadata: Optional[Dict[str, str]], state: Optional[str]) -> Op[List[SandboxInfo]]:
        params = [("label", f"{k}={v}") for k, v in (metadata or {}).items()]
        if state:
            params.append(("state", state))
        listed = yield Call("GET", "/v1/sandboxes", params=params)
        return [_info(raw) for raw in listed["sandboxes"]]

    @staticmethod
    def _receipt_op(receipt_id: str) -> Op[dict]:
        envelope: dict = yield Call("GET", f"/v1/receipts/{receipt_id}")
        return envelope

    def _get_info_op(self) -> Op[SandboxInfo]:
        return _info((yield Call("GET", _path(self.sandbox_id))))

    def _is_running_op(self) -> Op[bool]:
        try:
            return (yield from self._get_info_op()).state == "running"
        except NotFoundException:
            return False

    def _kill_op(self) -> Op[bool]:
        try:
            yield Call("DELETE", _path(self.sandbox_id))
            return True
        except NotFoundException:
            return False

    def _pause_op(self, cold: bool) -> Op[str]:
        yield Call("POST", _path(self.sandbox_id, "/pause"), json={"cold": cold})
        return self.sandbox_id

    def _resume_op(self) -> Op[None]:
        yield Call("POST", _path(self.sandbox_id, "/resume"))

    def _set_timeout_op(self, timeout: int) -> Op[None]:
        json = {"timeout_s": int(timeout)}
        yield Call("POST", _path(self.sandbox_id, "/timeout"), json=json)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sandbox_id!r})"


class Sandbox(_SandboxOps):
    """A sandbox: a named mvm microVM with a verified root, no network unless granted, and
    a signed receipt for every command. Use it as a context manager to kill it at the end."""

    def __init__(self, sandbox_id: str, api: Optional[Api] = None):
        super().__init__(sandbox_id)
        self._api = api or shared()
        self.commands, self.files = self._parts()
        self.pty = Pty(self._api, self.sandbox_id)

    def _parts(self) -> Tuple[Commands, Files]:
        """Its ``commands`` and ``files`` (the E2B layer's run strings through bash and
        resolve paths in the user's home)."""
        return Commands(self._api, self.sandbox_id), Files(self._api, self.sandbox_id)

    @classmethod
    def create(
        cls: Type[S],
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
        secrets: Optional[List[str]] = None,
        profile: Optional[str] = None,
        cold_boot: bool = False,
        volumes: Optional[List[str]] = None,
        api: Optional[Api] = None,
    ) -> S:
        """Creates a sandbox from ``image`` (``REFERENCE@sha256:…``, built into a signed
        bundle on first use), a signed ``plan`` file or a ``template`` the host maps to a pinned
        image (``[e2b.templates]``), and returns once it is ready. It is
        removed ``timeout`` seconds later (``0``/``None``: never) unless extended with
        :meth:`set_timeout`. ``allow_hosts`` grants egress (``HOST[:PORT]``); none by
        default. ``secrets`` names secrets of the host's store (``NAME[:ENV]``, as ``mvm up
        --secret``): a bound one is a placeholder in the sandbox, an unbound one its value,
        scrubbed from output. ``profile`` is the image's policy profile (``restrictive``,
        ``standard``, ``dev``). It is restored from its plan's boot snapshot (made by the
        plan's first launch on this host); ``cold_boot=True`` boots its kernel instead.
        ``volumes`` attaches encrypted volumes of the host's store, ``NAME:/PATH[:ro]`` as
        ``mvm up --volume`` (one sandbox at a time; a sandbox with volumes boots)."""
        api = api or shared()
        made = cls._create_op(
            image,
            plan,
            template,
            timeout,
            envs,
            metadata,
            cpus,
            memory_mb,
            allow_hosts,
            sandbox_id,
            secrets,
            profile,
            cold_boot,
            volumes,
        )
        return cls(api.run(made), api)

    @classmethod
    def connect(cls: Type[S], sandbox_id: str, api: Optional[Api] = None) -> S:
        """The sandbox ``sandbox_id``; a paused or cold one is resumed."""
        api = api or shared()
        return cls(api.run(cls._connect_op(sandbox_id)), api)

    @staticmethod
    def list(
        metadata: Optional[Dict[str, str]] = None,
        state: Optional[str] = None,
        api: Optional[Api] = None,
    ) -> List[SandboxInfo]:
        """Sandboxes (every named VM), those with all of ``metadata``'s labels and in
        ``state`` when given."""
        return (api or shared()).run(_SandboxOps._list_op(metadata, state))

    def get_info(self) -> SandboxInfo:
        """What the server knows of it now."""
        return self._api.run(self._get_info_op())

    def is_running(self) -> bool:
        """Whether it runs (not paused, cold or ended)."""
        return self._api.run(self._is_running_op())

    def kill(self) -> bool:
        """Stops and removes it; ``False`` if it was gone already."""
        return self._api.run(self._kill_op())

    def pause(self, cold: bool = False) -> str:
        """Pauses it (``cold``: saved to disk, holding no memory, its clock stopped);
        returns its id for :meth:`connect`."""
        return self._api.run(self._pause_op(cold))

    def resume(self) -> None:
        """Lets it run again (from paused or cold)."""
        self._api.run(self._resume_op())

    def set_timeout(self, timeout: int) -> None:
        """It is removed ``timeout`` seconds from now (``0``: never)."""
        self._api.run(self._set_timeout_op(timeout))

    def receipt(self, receipt_id: str) -> dict:
        """A command's signed run receipt (a DSSE envelope; ``mvm receipt verify`` checks
        it)."""
        return self._api.run(self._receipt_op(receipt_id))

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()


class AsyncSandbox(_SandboxOps):
    """A sandbox driven from asyncio: what :class:`Sandbox` does, awaited. Use it as an
    async context manager (``async with await AsyncSandbox.create(…) as sandbox``) to kill
    it at the end."""

    def __init__(self, sandbox_id: str, api: Optional[AsyncApi] = None):
        super().__init__(sandbox_id)
        self._api = api or shared_async()
        self.commands, self.files = self._parts()
        self.pty = AsyncPty(self._api, self.sandbox_id)

    def _parts(self) -> Tuple[AsyncCommands, AsyncFiles]:
        """Its ``commands`` and ``files``, as :meth:`Sandbox._parts`."""
        return AsyncCommands(self._api, self.sandbox_id), AsyncFiles(self._api, self.sandbox_id)

    @classmethod
    async def create(
        cls: Type[A],
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
        secrets: Optional[List[str]] = None,
        profile: Optional[str] = None,
        cold_boot: bool = False,
        volumes: Optional[List[str]] = None,
        api: Optional[AsyncApi] = None,
    ) -> A:
        """Creates a sandbox as :meth:`Sandbox.create` does, and returns once it is ready."""
        api = api or shared_async()
        made = cls._create_op(
            image,
            plan,
            template,
            timeout,
            envs,
            metadata,
            cpus,
            memory_mb,
            allow_hosts,
            sandbox_id,
            secrets,
            profile,
            cold_boot,
            volumes,
        )
        return cls(await api.run(made), api)

    @classmethod
    async def connect(cls: Type[A], sandbox_id: str, api: Optional[AsyncApi] = None) -> A:
        """The sandbox ``sandbox_id``; a paused or cold one is resumed."""
        api = api or shared_async()
        return cls(await api.run(cls._connect_op(sandbox_id)), api)

    @staticmethod
    async def list(
        metadata: Optional[Dict[str, str]] = None,
        state: Optional[str] = None,
        api: Optional[AsyncApi] = None,
    ) -> List[SandboxInfo]:
        """Sandboxes (every named VM), those with all of ``metadata``'s labels and in
        ``state`` when given."""
        return await (api or shared_async()).run(_SandboxOps._list_op(metadata, state))

    async def get_info(self) -> SandboxInfo:
        """What the server knows of it now."""
        return await self._api.run(self._get_info_op())

    async def is_running(self) -> bool:
        """Whether it runs (not paused, cold or ended)."""
        return await self._api.run(self._is_running_op())

    async def kill(self) -> bool:
        """Stops and removes it; ``False`` if it was gone already."""
        return await self._api.run(self._kill_op())

    async def pause(self, cold: bool = False) -> str:
        """Pauses it (``cold``: saved to disk, holding no memory, its clock stopped);
        returns its id for :meth:`connect`."""
        return await self._api.run(self._pause_op(cold))

    async def resume(self) -> None:
        """Lets it run again (from paused or cold)."""
        await self._api.run(self._resume_op())

    async def set_timeout(self, timeout: int) -> None:
        """It is removed ``timeout`` seconds from now (``0``: never)."""
        await self._api.run(self._set_timeout_op(timeout))

    async def receipt(self, receipt_id: str) -> dict:
        """A command's signed run receipt (a DSSE envelope; ``mvm receipt verify`` checks
        it)."""
        return await self._api.run(self._receipt_op(receipt_id))

    async def __aenter__(self: A) -> A:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.kill()


__all__ = ["Sandbox", "AsyncSandbox", "SandboxInfo", "DEFAULT_TIMEOUT"]
