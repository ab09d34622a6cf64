"""Files in a sandbox, with the agent's rules: the workload user's rights, under /tmp or the
user's home (when the image gives it one), symlinks never followed, bytes checked by SHA-256
end to end."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import (
    IO,
    Any,
    AsyncIterable,
    AsyncIterator,
    Iterator,
    List,
    Literal,
    Optional,
    Union,
    overload,
)

from ._api import Api, AsyncApi, Call, Op
from .exceptions import NotFoundException, SandboxException

#: What :meth:`Files.write` writes: text, bytes or a binary file object (read in 1 MiB
#: chunks, streamed).
Data = Union[str, bytes, IO[bytes]]
#: What :meth:`AsyncFiles.write` writes: also an async iterable of bytes (streamed).
AsyncData = Union[str, bytes, IO[bytes], AsyncIterable[bytes]]
#: A body as sent: bytes, or chunks.
_Body = Union[bytes, Iterator[bytes], AsyncIterable[bytes]]

#: The size of the chunks a file object is read in.
CHUNK = 1 << 20


@dataclass
class EntryInfo:
    """A path in the sandbox."""

    name: str
    path: str
    #: ``file``, ``directory``, ``symlink`` or ``other``.
    type: str
    size: int
    mode: int
    uid: int
    #: RFC 3339.
    modified_time: str


@dataclass
class WriteEntry:
    """One file for :meth:`Files.write` of many (``data`` an async iterable only with
    :class:`AsyncFiles`)."""

    path: str
    data: AsyncData


@dataclass
class WriteInfo:
    """A file written."""

    name: str
    path: str
    size: int
    sha256: str
    type: str = "file"


def _entry(e: dict) -> EntryInfo:
    return EntryInfo(
        name=e["name"],
        path=e["path"],
        type=e["kind"],
        size=e["size"],
        mode=e["mode"],
        uid=e["uid"],
        modified_time=e["modified"],
    )


def _body(data: AsyncData) -> _Body:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, AsyncIterable):
        return data
    source = data

    def read() -> Iterator[bytes]:
        while True:
            chunk = source.read(CHUNK)
            if not chunk:
                return
            yield chunk if isinstance(chunk, bytes) else chunk.encode()

    return read()


class _FilesOps:
    """What :class:`Files` and :class:`AsyncFiles` do, as ops."""

    def __init__(self, sandbox_id: str):
        self._base = f"/v1/sandboxes/{sandbox_id}/files"

    def _where_op(self, path: str) -> Op[str]:
        """The path the server is asked for (the E2B layer resolves relative ones in the
        user's home)."""
        yield from ()
        return path

    def _read_op(self, path: str, format: str) -> Op[Any]:
        if format not in ("text", "bytes", "stream"):
            raise ValueError(f"format is text, bytes or stream, not {format!r}")
        answer = "stream" if format == "stream" else "bytes"
        path = yield from self._where_op(path)
        data = yield Call("GET", self._base, params={"path": path}, answer=answer)
        return data.decode() if format == "text" else data

    def _write_op(
        self, path: Union[str, List[WriteEntry]], data: Optional[AsyncData], mode: int
    ) -> Op[Union[WriteInfo, List[WriteInfo]]]:
        if isinstance(path, list):
            written = []
            for entry in path:
                written.append((yield from self._write_one_op(entry.path, entry.data, 0o644)))
            return written
        if data is None:
            raise TypeError("write(path, data) needs data")
        return (yield from self._write_one_op(path, data, mode))

    def _write_one_op(self, path: str, data: AsyncData, mode: int) -> Op[WriteInfo]:
        path = yield from self._where_op(path)
        params = {"path": path, "mode": format(mode, "o")}
        body = _body(data)
        if isinstance(body, bytes):
            params["sha256"] = "sha256:" + hashlib.sha256(body).hexdigest()
        written = yield Call("PUT", self._base, params=params, content=body)
        return WriteInfo(
            name=path.rstrip("/").rsplit("/", 1)[-1],
            path=written["path"],
            size=written["size"],
            sha256=written["sha256"],
        )

    def _list_op(self, path: str, depth: int) -> Op[List[EntryInfo]]:
        path = yield from self._where_op(path)
        listed = yield Call("GET", f"{self._base}/list", params={"path": path, "depth": depth})
        return [_entry(e) for e in listed["entries"]]

    def _get_info_op(self, path: str) -> Op[EntryInfo]:
        path = yield from self._where_op(path)
        return _entry((yield Call("GET", f"{self._base}/stat", params={"path": path})))

    def _exists_op(self, path: str) -> Op[bool]:
        try:
            yield from self._get_info_op(path)
            return True
        except NotFoundException:
            return False
        except SandboxException as e:
            if e.code == "AGENT112":
                return False
            raise

    def _remove_op(self, path: str, recursive: bool) -> Op[None]:
        path = yield from self._where_op(path)
        params = {"path": path, "recursive": "true" if recursive else "false"}
        yield Call("DELETE", self._base, params=params)

    def _rename_op(self, old_path: str, new_path: str) -> Op[EntryInfo]:
        old_path = yield from self._where_op(old_path)
        new_path = yield from self._where_op(new_path)
        yield Call("POST", f"{self._base}/rename", json={"from": old_path, "to": new_path})
        return (yield from self._get_info_op(new_path))

    def _make_dir_op(self, path: str, mode: int) -> Op[bool]:
        path = yield from self._where_op(path)
        try:
            yield Call("POST", f"{self._base}/mkdir", json={"path": path, "mode": mode})
            return True
        except SandboxException as e:
            if e.code == "AGENT112" and (yield from self._exists_op(path)):
                return False
            raise


class Files(_FilesOps):
    """``sandbox.files``."""

    def __init__(self, api: Api, sandbox_id: str):
        super().__init__(sandbox_id)
        self._api = api

    @overload
    def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    def read(self, path: str, format: Literal["bytes"]) -> bytes: ...
    @overload
    def read(self, path: str, format: Literal["stream"]) -> Iterator[bytes]: ...

    def read(self, path: str, format: str = "text"):  # type: ignore[no-untyped-def]
        """A file's contents: ``text`` (UTF-8), ``bytes``, or a ``stream`` of chunks as they
        arrive (the request is sent when it is first read)."""
        return self._api.run(self._read_op(path, format))

    @overload
    def write(self, path: str, data: Data, mode: int = 0o644) -> WriteInfo: ...
    @overload
    def write(self, path: List[WriteEntry]) -> List[WriteInfo]: ...

    def write(self, path, data=None, mode=0o644):  # type: ignore[no-untyped-def]
        """Writes ``data`` (text, bytes or a binary file object, streamed) to ``path``,
        replacing it whole; or each of a list of :class:`WriteEntry`."""
        return self._api.run(self._write_op(path, data, mode))

    def list(self, path: str, depth: int = 1) -> List[EntryInfo]:
        """A directory's entries, to ``depth`` levels."""
        return self._api.run(self._list_op(path, depth))

    def get_info(self, path: str) -> EntryInfo:
        """One path (a symlink itself)."""
        return self._api.run(self._get_info_op(path))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a dangling symlink does)."""
        return self._api.run(self._exists_op(path))

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, a symlink or an empty directory (``recursive``: a whole tree)."""
        self._api.run(self._remove_op(path, recursive))

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        """Renames ``old_path`` to ``new_path`` (a file there is replaced)."""
        return self._api.run(self._rename_op(old_path, new_path))

    def make_dir(self, path: str, mode: int = 0o755) -> bool:
        """Creates a directory; ``False`` if it exists already."""
        return self._api.run(self._make_dir_op(path, mode))


class AsyncFiles(_FilesOps):
    """``sandbox.files`` of an :class:`~mvm.AsyncSandbox`."""

    def __init__(self, api: AsyncApi, sandbox_id: str):
        super().__init__(sandbox_id)
        self._api = api

    @overload
    async def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    async def read(self, path: str, format: Literal["bytes"]) -> bytes: ...
    @overload
    async def read(self, path: str, format: Literal["stream"]) -> AsyncIterator[bytes]: ...

    async def read(self, path: str, format: str = "text"):  # type: ignore[no-untyped-def]
        """A file's contents: ``text`` (UTF-8), ``bytes``, or an async iterator of chunks as
        they arrive (the request is sent when it is first read)."""
        return await self._api.run(self._read_op(path, format))

    @overload
    async def write(self, path: str, data: AsyncData, mode: int = 0o644) -> WriteInfo: ...
    @overload
    async def write(self, path: List[WriteEntry]) -> List[WriteInfo]: ...

    async def write(self, path, data=None, mode=0o644):  # type: ignore[no-untyped-def]
        """Writes ``data`` (text, bytes, a binary file object read in a thread, or an async
        iterable of bytes; streamed) to ``path``, replacing it whole; or each of a list of
        :class:`WriteEntry`."""
        return await self._api.run(self._write_op(path, data, mode))

    async def list(self, path: str, depth: int = 1) -> List[EntryInfo]:
        """A directory's entries, to ``depth`` levels."""
        return await self._api.run(self._list_op(path, depth))

    async def get_info(self, path: str) -> EntryInfo:
        """One path (a symlink itself)."""
        return await self._api.run(self._get_info_op(path))

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a dangling symlink does)."""
        return await self._api.run(self._exists_op(path))

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, a symlink or an empty directory (``recursive``: a whole tree)."""
        await self._api.run(self._remove_op(path, recursive))

    async def rename(self, old_path: str, new_path: str) -> EntryInfo:
        """Renames ``old_path`` to ``new_path`` (a file there is replaced)."""
        return await self._api.run(self._rename_op(old_path, new_path))

    async def make_dir(self, path: str, mode: int = 0o755) -> bool:
        """Creates a directory; ``False`` if it exists already."""
        return await self._api.run(self._make_dir_op(path, mode))


__all__ = ["Files", "AsyncFiles", "EntryInfo", "WriteEntry", "WriteInfo", "Data", "AsyncData"]
