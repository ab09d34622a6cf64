"""The connection to mvm's local API: HTTP/1.1 on ``$MVM_HOME/api.sock``, the server started
on demand (``mvm serve --idle-exit 10m``) when none answers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx

from .exceptions import SandboxException, from_answer

#: How long a started server has to answer.
START_WAIT_S = 15.0
#: How long the server the SDK starts stays up with nothing to do.
IDLE_EXIT = "10m"


def mvm_home() -> Path:
    """``$MVM_HOME``, else ``~/.mvm`` — as mvm itself finds it."""
    home = os.environ.get("MVM_HOME")
    if home:
        return Path(home)
    return Path.home() / ".mvm"


def socket_path() -> Path:
    """The API's socket: ``$MVM_API_SOCKET``, else ``$MVM_HOME/api.sock``."""
    given = os.environ.get("MVM_API_SOCKET")
    return Path(given) if given else mvm_home() / "api.sock"


def mvm_binary() -> str:
    """The ``mvm`` to start the server with: ``$MVM_BIN``, else ``mvm`` on the PATH."""
    return os.environ.get("MVM_BIN", "mvm")


class Api:
    """One connection pool to the server."""

    def __init__(self, socket: Optional[Path] = None, autostart: bool = True):
        self.socket = Path(socket) if socket else socket_path()
        self.autostart = autostart
        self._client: Optional[httpx.Client] = None

    def client(self) -> httpx.Client:
        if self._client is None:
            if not self._answers():
                if not self.autostart:
                    raise SandboxException(f"no mvm server answers on {self.socket}", "API006")
                self._start_server()
            self._client = httpx.Client(
                transport=httpx.HTTPTransport(uds=str(self.socket)),
                base_url="http://mvm",
                timeout=httpx.Timeout(None, connect=10.0),
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with httpx.Client(
                transport=httpx.HTTPTransport(uds=str(self.socket)),
                base_url="http://mvm",
                timeout=5.0,
            ) as probe:
                return probe.get("/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    def _start_server(self) -> None:
        args = [mvm_binary(), "serve", "--idle-exit", IDLE_EXIT]
        if os.environ.get("MVM_API_SOCKET"):
            args += ["--socket", str(self.socket)]
        try:
            subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            raise SandboxException(f"starting {args[0]} serve: {e}", "API006") from e
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            if self._answers():
                return
            time.sleep(0.05)
        raise SandboxException(f"mvm serve did not answer on {self.socket}", "API006")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        answer = self.client().request(method, path, **kwargs)
        check(answer)
        return answer

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.request(method, path, **kwargs)
        return answer.json() if answer.content else None

    def stream_lines(self, method: str, path: str, **kwargs: Any) -> Iterator[dict]:
        """The NDJSON lines of a streamed answer, parsed, as they come."""
        with self.client().stream(method, path, **kwargs) as answer:
            if answer.status_code >= 400:
                answer.read()
                check(answer)
            if "ndjson" not in answer.headers.get("content-type", ""):
                answer.read()
                yield answer.json()
                return
            for line in answer.iter_lines():
                if line:
                    yield json.loads(line)


def check(answer: httpx.Response) -> None:
    """Raises the SDK's exception for an error answer."""
    if answer.status_code < 400:
        return
    try:
        body = answer.json()
    except ValueError:
        body = {}
    raise from_answer(answer.status_code, body)


_shared: Optional[Api] = None


def shared() -> Api:
    """The process's connection, made on first use."""
    global _shared
    if _shared is None:
        _shared = Api()
    return _shared
