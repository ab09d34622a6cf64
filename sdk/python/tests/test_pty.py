"""Terminals (``sandbox.pty``): a shell on a real pseudo-terminal in the guest, typed to,
resized and interrupted; refused where the plan grants no terminal."""

import threading
import time

import pytest

from mvm import CommandExitException, PtySize, Sandbox, SandboxException


@pytest.fixture(scope="module")
def dev_sandbox(image):
    """A sandbox of the ``dev`` profile: its plan grants a terminal."""
    sandbox = Sandbox.create(image, profile="dev", timeout=600)
    yield sandbox
    sandbox.kill()


class Screen:
    """What a terminal printed, gathered by a thread that waits for the command's end."""

    def __init__(self, handle):
        self.handle = handle
        self.printed = bytearray()
        self.lock = threading.Lock()
        self.outcome = None
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self):
        def printed(data: bytes):
            assert isinstance(data, bytes)
            with self.lock:
                self.printed += data

        try:
            self.outcome = self.handle.wait(on_pty=printed)
        except Exception as e:  # the test looks at it
            self.outcome = e

    def text(self) -> str:
        with self.lock:
            return self.printed.decode(errors="replace")

    def type_until(self, keys: str, wanted: str, timeout: float = 30) -> str:
        """Types ``keys``, then waits for ``wanted`` to appear after what was there."""
        start = len(self.text())
        self.handle.send_stdin(keys)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = self.text()[start:]
            if wanted in after:
                return after
            time.sleep(0.05)
        raise AssertionError(f"{wanted!r} never came after {keys!r}: {self.text()!r}")


def test_a_terminal_is_typed_to_resized_interrupted_and_ends_with_its_status(dev_sandbox):
    handle = dev_sandbox.pty.create(PtySize(rows=24, cols=80))
    screen = Screen(handle)
    shown = screen.type_until("tty; echo term=$TERM.\r", "term=xterm-256color.")
    assert "/dev/pts/" in shown
    assert "24 80" in screen.type_until("stty size\r", "24 80")
    handle.resize(PtySize(rows=30, cols=100))
    assert "30 100" in screen.type_until("stty size\r", "30 100")
    # Ctrl-C interrupts the foreground job, not the shell.
    handle.send_stdin("sleep 30\r")
    time.sleep(1)
    started = time.monotonic()
    screen.type_until("\x03", "\n")
    screen.type_until("echo after-$?\r", "after-130")
    assert time.monotonic() - started < 20
    handle.send_stdin("exit 3\r")
    screen.thread.join(timeout=30)
    assert isinstance(screen.outcome, CommandExitException), screen.outcome
    assert screen.outcome.exit_code == 3
    # The result holds it all, decoded.
    assert "after-130" in screen.outcome.stdout


def test_a_command_on_a_terminal_and_its_handle_by_pid(dev_sandbox):
    handle = dev_sandbox.pty.create(PtySize(rows=5, cols=40), cmd="stty size; tty")
    result = dev_sandbox.pty.connect(handle.pid).wait()
    lines = result.stdout.split("\r\n")
    assert lines[0] == "5 40"
    assert lines[1].startswith("/dev/pts/")
    # A command that has ended cannot be resized.
    with pytest.raises(SandboxException) as raised:
        dev_sandbox.pty.resize(handle.pid, PtySize(rows=10, cols=10))
    assert raised.value.status == 404
    # Nor can a size past the limit be asked for.
    other = dev_sandbox.pty.create(cmd="sleep 30")
    with pytest.raises(SandboxException) as raised:
        other.resize(PtySize(rows=0, cols=10))
    assert raised.value.status == 400
    assert dev_sandbox.pty.kill(other.pid)


def test_no_terminal_where_the_plan_grants_none(sandbox):
    # The shared sandbox is `standard`, built without the terminal grant.
    handle = sandbox.pty.create()
    with pytest.raises(SandboxException) as raised:
        handle.wait()
    assert raised.value.code == "AGENT120"
    # A command started without a terminal cannot be resized.
    plain = sandbox.commands.run("sleep 30", background=True)
    with pytest.raises(SandboxException) as raised:
        sandbox.pty.resize(plain.pid, PtySize(rows=10, cols=10))
    assert raised.value.status == 400
    plain.kill()
