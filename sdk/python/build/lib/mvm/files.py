"""Files in a sandbox, with the agent's rules: the workload user's rights, under /tmp,
symlinks never followed, bytes checked by SHA-256 end to end."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO, Iterator, List, Literal, Optional, Union, overload

from ._api import Api
from .exceptions import NotFoundException, SandboxException

Data = Union[str, bytes, IO[bytes]]


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
    """One file for :meth:`Files.write` of many."""

    path: str
    data: Data


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


def _chunks(data: Data) -> Union[bytes, Iterator[bytes]]:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)

    def read() -> Iterator[bytes]:
        while True:
            chunk = data.read(1 << 20)
            if not chunk:
                return
            yield chunk if isinstance(chunk, bytes) else chunk.encode()

    return read()


class Files:
    """``sandbox.files``."""

    def __init__(self, api: Api, sandbox_id: str):
        self._api = api
        self._base = f"/v1/sandboxes/{sandbox_id}/files"

    @overload
    def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    def read(self, path: str, format: Literal["bytes"]) -> bytes: ...
    @overload
    def read(self, path: str, format: Literal["stream"]) -> Iterator[bytes]: ...

    def read(self, path: str, format: str = "text"):  # type: ignore[no-untyped-def]
        """A file's contents: ``text`` (UTF-8), ``bytes``, or a ``stream`` of chunks (read
        to its end before the next call on this sandbox)."""
        if format == "stream":
            return self._stream(path)
        data = self._api.request("GET", self._base, params={"path": path}).content
        if format == "bytes":
            return data
        if format == "text":
            return data.decode()
        raise ValueError(f"format is text, bytes or stream, not {format!r}")

    def _stream(self, path: str) -> Iterator[bytes]:
        with self._api.client().stream("GET", self._base, params={"path": path}) as answer:
            if answer.status_code >= 400:
                answer.read()
                from ._api import check

                check(answer)
            yield from answer.iter_bytes()

    @overload
    def write(self, path: str, data: Data, mode: int = 0o644) -> WriteInfo: ...
    @overload
    def write(self, path: List[WriteEntry]) -> List[WriteInfo]: ...

    def write(self, path, data=None, mode=0o644):  # type: ignore[no-untyped-def]
        """Writes ``data`` (text, bytes or a binary file object, streamed) to ``path``,
        replacing it whole; or each of a list of :class:`WriteEntry`."""
        if isinstance(path, list):
            return [self.write(entry.path, entry.data) for entry in path]
        if data is None:
            raise TypeError("write(path, data) needs data")
        params = {"path": path, "mode": format(mode, "o")}
        body = _chunks(data)
        if isinstance(body, bytes):
            params["sha256"] = "sha256:" + hashlib.sha256(body).hexdigest()
        written = self._api.json("PUT", self._base, params=params, content=body)
        return WriteInfo(
            name=path.rstrip("/").rsplit("/", 1)[-1],
            path=written["path"],
            size=written["size"],
            sha256=written["sha256"],
        )

    def list(self, path: str, depth: int = 1) -> List[EntryInfo]:
        """A directory's entries, to ``depth`` levels."""
        listed = self._api.json(
            "GET", f"{self._base}/list", params={"path": path, "depth": depth}
        )
        return [_entry(e) for e in listed["entries"]]

    def get_info(self, path: str) -> EntryInfo:
        """One path (a symlink itself)."""
        return _entry(self._api.json("GET", f"{self._base}/stat", params={"path": path}))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a dangling symlink does)."""
        try:
            self.get_info(path)
            return True
        except NotFoundException:
            return False
        except SandboxException as e:
            if e.code == "AGENT112":
                return False
            raise

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, a symlink or an empty directory (``recursive``: a whole tree)."""
        params = {"path": path, "recursive": "true" if recursive else "false"}
        self._api.request("DELETE", self._base, params=params)

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        """Renames ``old_path`` to ``new_path`` (a file there is replaced)."""
        self._api.request("POST", f"{self._base}/rename", json={"from": old_path, "to": new_path})
        return self.get_info(new_path)

    def make_dir(self, path: str, mode: int = 0o755) -> bool:
        """Creates a directory; ``False`` if it exists already."""
        try:
            self._api.request("POST", f"{self._base}/mkdir", json={"path": path, "mode": mode})
            return True
        except SandboxException as e:
            if e.code == "AGENT112" and self.exists(path):
                return False
            raise
