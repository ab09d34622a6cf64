"""Sandboxes' lives: listed by label, paused and resumed (also from cold), connected to by
id, removed when their time is up, eight driven at once; errors with codes."""

import threading
import time

import pytest

from mvm import InvalidArgumentException, NotFoundException, Sandbox, SandboxException


def test_sandboxes_are_listed_by_label_and_state(sandbox):
    mine = Sandbox.list(metadata={"suite": "python"})
    assert [s.sandbox_id for s in mine] == [sandbox.sandbox_id]
    assert mine[0].state == "running"
    assert mine[0].expires_at
    assert Sandbox.list(metadata={"suite": "nobody"}) == []
    assert sandbox.sandbox_id in [s.sandbox_id for s in Sandbox.list(state="running")]


def test_unknown_sandboxes_and_bad_requests_have_codes(image):
    with pytest.raises(NotFoundException) as raised:
        Sandbox.connect("no-such-sandbox")
    assert raised.value.code == "RUN036"
    with pytest.raises(InvalidArgumentException) as raised:
        Sandbox.create(image, sandbox_id="Not A Name")
    assert raised.value.code == "RUN035"
    with pytest.raises(InvalidArgumentException) as raised:
        Sandbox.create(image, timeout=10**9)
    assert raised.value.code == "API001"
    # Policy: permissive is never started through the API; restrictive grants no network.
    with pytest.raises(InvalidArgumentException) as raised:
        Sandbox.create(image, profile="permissive")
    assert raised.value.code == "API001"
    with pytest.raises(SandboxException) as raised:
        Sandbox.create(image, profile="restrictive", allow_hosts=["api.example.com"])
    assert raised.value.code == "BUILD011"
    with pytest.raises(InvalidArgumentException) as raised:
        Sandbox.create(image, secrets=["Not A Secret"])
    assert raised.value.code == "API001"


def test_a_paused_sandbox_resumes_warm_and_from_cold(sandbox):
    sandbox.files.write("/tmp/kept.txt", "kept across a cold save")
    sandbox.pause()
    assert not sandbox.is_running()
    assert sandbox.get_info().state == "paused"
    again = Sandbox.connect(sandbox.sandbox_id)
    assert again.is_running()
    assert again.commands.run("echo warm").stdout == "warm\n"
    sandbox.pause(cold=True)
    cold = sandbox.get_info()
    assert (cold.state, cold.expires_at) == ("cold", None)
    woken = Sandbox.connect(sandbox.sandbox_id)
    assert woken.get_info().state == "running"
    assert woken.get_info().expires_at
    assert woken.files.read("/tmp/kept.txt") == "kept across a cold save"


def test_eight_sandboxes_are_driven_at_once_and_each_is_removed_when_its_time_is_up(image):
    made = []
    failures = []

    def drive(n):
        try:
            box = Sandbox.create(image, timeout=120, metadata={"suite": "eight"})
            made.append(box)
            box.files.write(f"/tmp/{n}.txt", str(n) * 1000)
            out = box.commands.run(f"cat /tmp/{n}.txt | wc -c").stdout.strip()
            assert out == "1000", out
        except Exception as e:  # reported below, with which sandbox
            failures.append((n, repr(e)))

    threads = [threading.Thread(target=drive, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(Sandbox.list(metadata={"suite": "eight"})) == 8
    # Their time is made short; the server removes them when it is up.
    for box in made:
        box.set_timeout(1)
    deadline = time.monotonic() + 60
    while Sandbox.list(metadata={"suite": "eight"}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert Sandbox.list(metadata={"suite": "eight"}) == []
    assert not made[0].kill()


def test_a_sandbox_is_restored_from_its_plans_boot_snapshot_unless_a_cold_boot_is_asked(image):
    with Sandbox.create(image, timeout=120) as restored:
        snapshot = restored.get_info().boot_snapshot
        assert snapshot and len(snapshot) == 64, snapshot
    with Sandbox.create(image, timeout=120, cold_boot=True) as booted:
        assert booted.get_info().boot_snapshot is None
        assert booted.commands.run("echo booted").stdout == "booted\n"
