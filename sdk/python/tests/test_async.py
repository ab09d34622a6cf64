"""AsyncSandbox: what Sandbox does, awaited — commands with coroutine and plain callbacks while
the event loop runs on, background commands with input, files streamed both ways, lives paused
and resumed, and three sandboxes driven at once from one loop. Each test is an
``asyncio.run`` of its own, as programs are: the sandbox made in one loop is used from the
next ones."""

import asyncio
import base64
import hashlib
import io
import json
import os
import time

import pytest

from mvm import (
    AsyncCommandHandle,
    AsyncSandbox,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    TimeoutException,
    WriteEntry,
)
from mvm._api import shared_async

LABEL = {"suite": "python-async"}


def run(coro):
    """``asyncio.run(coro)``, the loop's client closed at the end."""

    async def main():
        try:
            return await coro
        finally:
            await shared_async().aclose()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def box(image):
    """One sandbox for the tests that can share it (a boot costs seconds), made in a loop of
    its own: each test uses it from another."""
    sandbox = run(
        AsyncSandbox.create(image, envs={"GREETING": "hello"}, metadata=LABEL, timeout=600)
    )
    yield sandbox
    run(sandbox.kill())


def test_it_is_made_with_envs_and_labels_described_listed_and_run_in(box):
    async def main():
        info = await box.get_info()
        assert (info.sandbox_id, info.state, info.metadata) == (box.sandbox_id, "running", LABEL)
        assert info.expires_at
        assert await box.is_running()
        assert [s.sandbox_id for s in await AsyncSandbox.list(metadata=LABEL)] == [box.id]
        assert await AsyncSandbox.list(metadata={"suite": "nobody"}) == []
        running = await AsyncSandbox.list(state="running")
        assert box.sandbox_id in [s.sandbox_id for s in running]

        result = await box.commands.run("echo $GREETING $WHO; echo oops >&2", envs={"WHO": "you"})
        assert (result.stdout, result.stderr, result.exit_code) == ("hello you\n", "oops\n", 0)
        assert (await box.commands.run(["echo", "a b", "$GREETING"])).stdout == "a b $GREETING\n"
        assert (await box.commands.run("pwd", cwd="/tmp")).stdout == "/tmp\n"
        envelope = await box.receipt(result.receipt)
        receipt = json.loads(base64.b64decode(envelope["payload"]))
        assert receipt["vm"] == info.vm
        assert receipt["result"] == {"kind": "exited", "code": 0}

    run(main())


def test_output_reaches_coroutine_and_plain_callbacks_while_the_command_and_the_loop_run(box):
    async def main():
        seen = []
        started = time.monotonic()

        async def on_stdout(text):
            await asyncio.sleep(0)
            seen.append(("stdout", text, time.monotonic() - started))

        def on_stderr(text):
            seen.append(("stderr", text, time.monotonic() - started))

        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.1)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        result = await box.commands.run(
            "echo first; sleep 2; echo second >&2; sleep 1; echo third",
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        ticking.cancel()
        assert [(kind, text) for kind, text, _ in seen] == [
            ("stdout", "first\n"),
            ("stderr", "second\n"),
            ("stdout", "third\n"),
        ]
        # Each piece arrived as it was written, not with the command's end ...
        assert seen[1][2] - seen[0][2] > 1.0
        assert seen[2][2] - seen[1][2] > 0.5
        # ... and the loop ran other tasks meanwhile (about 30 ticks of 0.1 s).
        assert ticks >= 15
        assert (result.stdout, result.stderr) == ("first\nthird\n", "second\n")

    run(main())


def test_exits_timeouts_and_refusals_raise_with_their_codes(box):
    async def main():
        with pytest.raises(CommandExitException) as raised:
            await box.commands.run("echo partial; exit 3")
        assert (raised.value.exit_code, raised.value.stdout) == (3, "partial\n")
        assert raised.value.result.receipt
        started = time.monotonic()
        with pytest.raises(TimeoutException):
            await box.commands.run("sleep 30", timeout=1)
        assert time.monotonic() - started < 20
        with pytest.raises(InvalidArgumentException) as raised:
            await box.commands.run(["/no/such/program"])
        assert raised.value.code == "AGENT101"
        with pytest.raises(InvalidArgumentException) as raised:
            await box.files.read("/etc/passwd")
        assert raised.value.code == "AGENT107"
        with pytest.raises(NotFoundException) as raised:
            await AsyncSandbox.connect("no-such-sandbox")
        assert raised.value.code == "RUN036"

    run(main())


def test_a_background_command_takes_input_and_is_waited_for(box):
    async def main():
        handle = await box.commands.run(
            "read a; read b; echo got $a $b; cat", background=True, stdin=True
        )
        assert isinstance(handle, AsyncCommandHandle)
        await handle.send_stdin("one\n")
        await box.commands.send_stdin(handle.pid, b"two\nrest")
        await handle.close_stdin()
        result = await handle.wait()
        assert result.stdout == "got one two\nrest"
        listed = {p.pid: p for p in await box.commands.list()}
        assert (listed[handle.pid].running, listed[handle.pid].exit_code) == (False, 0)
        # Connecting again later replays what it wrote.
        again = await box.commands.connect(handle.pid)
        assert (await again.wait()).stdout == "got one two\nrest"

    run(main())


def test_a_background_command_is_followed_by_a_task_while_it_is_listed_and_killed(box):
    async def main():
        handle = await box.commands.run("echo up; sleep 60", background=True)
        up = asyncio.Event()
        follower = asyncio.create_task(handle.wait(on_stdout=lambda text: up.set()))
        await asyncio.wait_for(up.wait(), 30)
        mine = [p for p in await box.commands.list() if p.pid == handle.pid]
        assert mine and mine[0].running
        assert mine[0].cmd == ["sh", "-c", "echo up; sleep 60"]
        assert await box.commands.kill(handle.pid)
        with pytest.raises(CommandExitException) as raised:
            await asyncio.wait_for(follower, 30)
        assert (raised.value.exit_code, raised.value.result.signal) == (128 + 9, 9)
        assert raised.value.stdout == "up\n"
        assert not await handle.kill()

    run(main())


def test_files_are_written_read_listed_and_removed(box):
    async def main():
        info = await box.files.write("/tmp/hello.txt", "héllo\n")
        assert (info.path, info.size, info.name) == ("/tmp/hello.txt", 7, "hello.txt")
        assert await box.files.read("/tmp/hello.txt") == "héllo\n"
        assert (await box.commands.run("cat /tmp/hello.txt")).stdout == "héllo\n"
        binary = bytes(range(256)) * 4
        await box.files.write("/tmp/bin.dat", binary, mode=0o600)
        assert await box.files.read("/tmp/bin.dat", format="bytes") == binary
        assert (await box.files.get_info("/tmp/bin.dat")).mode == 0o600

        async def pieces():
            yield b"as"
            yield b"ync"

        assert await box.files.make_dir("/tmp/adir")
        assert not await box.files.make_dir("/tmp/adir")
        written = await box.files.write(
            [WriteEntry("/tmp/adir/a.txt", "a"), WriteEntry("/tmp/adir/b.txt", pieces())]
        )
        assert [w.size for w in written] == [1, 5]
        assert await box.files.read("/tmp/adir/b.txt") == "async"
        listed = {e.path: e.type for e in await box.files.list("/tmp/adir")}
        assert listed == {"/tmp/adir/a.txt": "file", "/tmp/adir/b.txt": "file"}
        moved = await box.files.rename("/tmp/adir/a.txt", "/tmp/adir/c.txt")
        assert (moved.path, moved.size) == ("/tmp/adir/c.txt", 1)
        assert await box.files.exists("/tmp/adir/c.txt")
        assert not await box.files.exists("/tmp/adir/a.txt")
        await box.files.remove("/tmp/hello.txt")
        assert not await box.files.exists("/tmp/hello.txt")
        await box.files.remove("/tmp/adir", recursive=True)
        assert not await box.files.exists("/tmp/adir")

    run(main())


def test_mebibytes_stream_both_ways_unchanged(box):
    async def main():
        mib = 16
        block = hashlib.sha256(b"async seed").digest() * (1 << 15)  # 1 MiB
        sent = hashlib.sha256()

        async def chunks():
            for i in range(mib):
                piece = block[i:] + block[:i]
                sent.update(piece)
                yield piece

        written = await box.files.write("/tmp/big.bin", chunks())
        expected = sent.hexdigest()
        assert (written.size, written.sha256) == (mib << 20, "sha256:" + expected)
        received = hashlib.sha256()
        total = pieces = 0
        async for chunk in await box.files.read("/tmp/big.bin", format="stream"):
            received.update(chunk)
            total += len(chunk)
            pieces += 1
        assert (total, received.hexdigest()) == (mib << 20, expected)
        assert pieces > 1
        in_guest = (await box.commands.run("sha256sum /tmp/big.bin")).stdout.split()[0]
        assert in_guest == expected
        # A binary file object is read in a thread, chunk by chunk, and streamed too.
        data = os.urandom(3 << 20)
        written = await box.files.write("/tmp/big.bin", io.BytesIO(data))
        assert written.sha256 == "sha256:" + hashlib.sha256(data).hexdigest()
        assert await box.files.read("/tmp/big.bin", format="bytes") == data
        await box.files.remove("/tmp/big.bin")

    run(main())


def test_it_is_paused_resumed_warm_and_from_cold_and_its_time_set(box):
    async def main():
        await box.files.write("/tmp/kept.txt", "kept across a cold save")
        assert await box.pause() == box.sandbox_id
        assert not await box.is_running()
        assert (await box.get_info()).state == "paused"
        await box.resume()
        assert await box.is_running()
        assert (await box.commands.run("echo warm")).stdout == "warm\n"
        await box.pause(cold=True)
        cold = await box.get_info()
        assert (cold.state, cold.expires_at) == ("cold", None)
        woken = await AsyncSandbox.connect(box.sandbox_id)
        assert (await woken.get_info()).state == "running"
        assert await woken.files.read("/tmp/kept.txt") == "kept across a cold save"
        before = (await box.get_info()).expires_at
        await box.set_timeout(3600)
        after = (await box.get_info()).expires_at
        assert before and after and after > before

    run(main())


def test_three_sandboxes_are_driven_at_once_from_one_loop_and_killed_leaving_async_with(image):
    label = {"suite": "python-async-three"}

    async def main():
        made = []
        all_made = asyncio.Event()

        async def drive(n):
            async with await AsyncSandbox.create(image, timeout=120, metadata=label) as sandbox:
                made.append(sandbox)
                if len(made) == 3:
                    all_made.set()
                await asyncio.wait_for(all_made.wait(), 120)
                assert len(await AsyncSandbox.list(metadata=label)) == 3
                await sandbox.files.write(f"/tmp/{n}.txt", str(n) * 1000)
                done = await sandbox.commands.run(f"cat /tmp/{n}.txt | wc -c")
                return sandbox.sandbox_id, done.stdout.strip()

        driven = await asyncio.gather(*(drive(n) for n in range(3)))
        assert [out for _, out in driven] == ["1000"] * 3
        assert len({sandbox_id for sandbox_id, _ in driven}) == 3
        # Leaving `async with` killed each.
        assert await AsyncSandbox.list(metadata=label) == []
        assert not await made[0].is_running()
        assert not await made[0].kill()

    run(main())
