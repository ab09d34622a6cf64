"""Commands: to completion, streamed, in the background with input, killed, listed; their
errors with codes and their signed receipts."""

import base64
import json
import os
import signal
import socket
import threading
import time

import pytest

from mvm import (
    CommandExitException,
    InvalidArgumentException,
    SandboxException,
    TimeoutException,
)


def test_a_command_runs_to_completion_with_the_sandboxes_and_its_own_env(sandbox):
    result = sandbox.commands.run("echo $GREETING $WHO; echo oops >&2", envs={"WHO": "there"})
    assert (result.stdout, result.stderr, result.exit_code) == ("hello there\n", "oops\n", 0)
    assert result.error is None
    assert result.duration_ms > 0
    argv = sandbox.commands.run(["echo", "a b", "$GREETING"])
    assert argv.stdout == "a b $GREETING\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"


def test_a_secret_of_the_sandbox_is_scrubbed_from_what_comes_back(sandbox):
    # `sdk-token` is unbound: the command holds its value, the SDK never sees it.
    result = sandbox.commands.run("echo $SDK_TOKEN; echo $SDK_TOKEN >&2; echo ${#SDK_TOKEN}")
    secret = os.environ["MVM_TEST_SECRET"]
    assert result.stdout == f"[REDACTED:sdk-token]\n{len(secret)}\n"
    assert result.stderr == "[REDACTED:sdk-token]\n"


def test_a_non_zero_exit_raises_with_the_result(sandbox):
    with pytest.raises(CommandExitException) as raised:
        sandbox.commands.run("echo partial; exit 3")
    assert raised.value.exit_code == 3
    assert raised.value.stdout == "partial\n"
    assert raised.value.result.receipt


def test_output_reaches_the_callbacks_while_the_command_runs(sandbox):
    seen = []
    started = time.monotonic()
    sandbox.commands.run(
        "echo first; sleep 2; echo second",
        on_stdout=lambda text: seen.append((text, time.monotonic() - started)),
    )
    assert [text for text, _ in seen] == ["first\n", "second\n"]
    # The first line arrived before the command's end, not with it.
    assert seen[1][1] - seen[0][1] > 1.0


def test_a_command_past_its_timeout_is_killed(sandbox):
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - started < 20


def test_what_the_agent_refuses_comes_back_with_its_code(sandbox):
    with pytest.raises(InvalidArgumentException) as raised:
        sandbox.commands.run(["/no/such/program"])
    assert raised.value.code == "AGENT101"
    with pytest.raises(InvalidArgumentException) as raised:
        sandbox.commands.run("true", user="root")
    assert raised.value.code == "AGENT114"


def test_a_background_command_takes_input_and_is_waited_for(sandbox):
    handle = sandbox.commands.run(
        "read a; read b; echo got $a $b; cat", background=True, stdin=True
    )
    assert isinstance(handle.pid, int)
    handle.send_stdin("one\n")
    sandbox.commands.send_stdin(handle.pid, b"two\nrest")
    handle.close_stdin()
    result = handle.wait()
    assert result.stdout == "got one two\nrest"
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert listed[handle.pid].running is False
    assert listed[handle.pid].exit_code == 0
    # Connecting again later replays what it wrote.
    assert sandbox.commands.connect(handle.pid).wait().stdout == "got one two\nrest"


def test_a_background_command_is_listed_while_it_runs_and_killed(sandbox):
    handle = sandbox.commands.run("echo up; sleep 60", background=True)
    # A second client follows its output; it is killed once "up" came.
    up = threading.Event()
    outcome = {}

    def follow():
        try:
            handle.wait(on_stdout=lambda text: up.set())
        except CommandExitException as e:
            outcome["raised"] = e

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert up.wait(30)
    running = [p for p in sandbox.commands.list() if p.pid == handle.pid]
    assert running and running[0].running
    assert running[0].cmd == ["sh", "-c", "echo up; sleep 60"]
    assert sandbox.commands.kill(handle.pid)
    follower.join(30)
    raised = outcome["raised"]
    assert raised.exit_code == 128 + 9
    assert raised.result.signal == 9
    assert raised.stdout == "up\n"
    assert not handle.kill()


def test_every_command_leaves_a_signed_receipt(sandbox):
    result = sandbox.commands.run("echo receipt")
    envelope = sandbox.receipt(result.receipt)
    assert envelope["payloadType"] == "application/vnd.mvm.receipt.v1+json"
    receipt = json.loads(base64.b64decode(envelope["payload"]))
    assert receipt["vm"] == sandbox.get_info().vm
    assert receipt["result"] == {"kind": "exited", "code": 0}
    assert receipt["stdout"]["bytes"] == len("receipt\n")


def test_a_foreground_command_whose_client_goes_away_is_ended(sandbox):
    api = sandbox._api
    path = f"/v1/sandboxes/{sandbox.sandbox_id}/commands"
    spec = {"argv": ["sh", "-c", "echo started; sleep 60"], "timeout_s": 120}
    with api.client().stream("POST", path, json=spec) as answer:
        lines = answer.iter_lines()
        started = json.loads(next(lines))
        assert started["type"] == "started"
        assert json.loads(next(lines))["type"] == "stdout"
    # The answer was dropped with the command still running: it is killed, not left behind.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        mine = [p for p in sandbox.commands.list() if p.pid == started["id"]]
        if mine and not mine[0].running:
            break
        time.sleep(0.2)
    assert mine and not mine[0].running


def wait_until_nothing_listens(path):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return
        finally:
            probe.close()
        time.sleep(0.05)
    raise AssertionError(f"something still listens on {path}")


def test_a_server_that_dies_mid_command_ends_it_and_the_next_call_starts_another(sandbox):
    up = threading.Event()
    failed = []

    def run():
        try:
            sandbox.commands.run("echo up; sleep 32", on_stdout=lambda _: up.set())
        except SandboxException as e:
            failed.append(e.code)

    running = threading.Thread(target=run)
    running.start()
    assert up.wait(30)
    dead = sandbox._api.json("GET", "/v1/health")["pid"]
    os.kill(dead, signal.SIGKILL)
    running.join(30)
    assert failed == ["API006"]
    # A killed process closes its files a moment after the kill; until then its listening
    # socket still queues connections (and resets them). Wait until it refuses.
    wait_until_nothing_listens(sandbox._api.socket)
    # The sandbox outlives its server; the SDK starts a new one for the next call.
    assert sandbox.commands.run("echo again").stdout == "again\n"
    assert sandbox._api.json("GET", "/v1/health")["pid"] != dead
    # The command's client went with the server, so the runner killed it.
    deadline = time.monotonic() + 20
    while "sleep 32" in sandbox.commands.run("ps").stdout and time.monotonic() < deadline:
        time.sleep(0.25)
    assert "sleep 32" not in sandbox.commands.run("ps").stdout


def test_more_commands_than_a_vm_has_room_for_clients_run_one_after_another(sandbox):
    # A VM's control socket serves 64 clients at once (RUN050); commands that ended, which
    # the server remembers, hold none of them.
    for n in range(70):
        assert sandbox.commands.run(["true"]).exit_code == 0, n
