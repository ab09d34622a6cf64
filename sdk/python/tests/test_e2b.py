"""E2B-style programs, unchanged but for their import line (``from e2b import …`` became
``from mvm.compat.e2b import …``): the quickstart patterns on mvm, with ``Sandbox`` and with
``AsyncSandbox``, and what mvm refuses to widen."""

import asyncio
import os
from pathlib import Path

import pytest

from mvm.compat.e2b import AsyncSandbox, CommandExitException, InvalidArgumentException, Sandbox


@pytest.fixture(scope="module", autouse=True)
def templates(image):
    """The host maps E2B's template names to pinned images."""
    config = Path(os.environ["MVM_HOME"]) / "config.toml"
    config.write_text(f'[e2b.templates]\nbase = "{image}"\nloose = "busybox:latest"\n')
    yield
    config.unlink()


def e2b_quickstart():
    # --- as written for E2B ---
    with Sandbox.create(timeout=120) as sandbox:
        sandbox.files.write("/tmp/script.sh", 'echo "$GREETING from $(pwd)"')
        result = sandbox.commands.run("sh /tmp/script.sh", envs={"GREETING": "hi"}, cwd="/tmp")
        sandbox.files.write("/tmp/out.txt", result.stdout)
        saved = sandbox.files.read("/tmp/out.txt")
        server = sandbox.commands.run("while true; do sleep 1; done", background=True)
        killed = server.kill()
        try:
            sandbox.commands.run("exit 7")
            failed = None
        except CommandExitException as e:
            failed = e.exit_code
        names = [entry.name for entry in sandbox.files.list("/tmp")]
        # E2B's home: commands start in it, relative paths are in it.
        sandbox.files.make_dir("notes")
        sandbox.files.write("notes/today.txt", "written relative")
        sandbox.files.write("/home/user/hello.txt", "hello, ")
        home = sandbox.commands.run("pwd; echo $HOME; cat hello.txt notes/today.txt").stdout
        listed = [entry.name for entry in sandbox.files.list("/home/user")]
        try:
            sandbox.commands.run("pwd", user="root")
            as_root = "ran as root"
        except InvalidArgumentException as e:
            as_root = e.code
        return saved, killed, failed, names, (home, listed, as_root), sandbox.is_running()
    # ---


async def e2b_async_quickstart():
    # --- as written for E2B ---
    async with await AsyncSandbox.create(timeout=120) as sandbox:
        await sandbox.files.write("/tmp/script.sh", 'echo "$GREETING from $(pwd)"')
        result = await sandbox.commands.run(
            "sh /tmp/script.sh", envs={"GREETING": "hi"}, cwd="/tmp"
        )
        await sandbox.files.write("/tmp/out.txt", result.stdout)
        saved = await sandbox.files.read("/tmp/out.txt")
        server = await sandbox.commands.run("while true; do sleep 1; done", background=True)
        killed = await server.kill()
        try:
            await sandbox.commands.run("exit 7")
            failed = None
        except CommandExitException as e:
            failed = e.exit_code
        names = [entry.name for entry in await sandbox.files.list("/tmp")]
        await sandbox.files.make_dir("notes")
        await sandbox.files.write("notes/today.txt", "written relative")
        await sandbox.files.write("/home/user/hello.txt", "hello, ")
        ran = await sandbox.commands.run("pwd; echo $HOME; cat hello.txt notes/today.txt")
        listed = [entry.name for entry in await sandbox.files.list("/home/user")]
        try:
            await sandbox.commands.run("pwd", user="root")
            as_root = "ran as root"
        except InvalidArgumentException as e:
            as_root = e.code
        return saved, killed, failed, names, (ran.stdout, listed, as_root), await sandbox.is_running()
    # ---


@pytest.mark.parametrize("quickstart", ["sync", "async"])
def test_the_quickstart_runs_on_mvm(quickstart):
    if quickstart == "sync":
        saved, killed, failed, names, home, running = e2b_quickstart()
    else:
        saved, killed, failed, names, home, running = asyncio.run(e2b_async_quickstart())
    assert saved == "hi from /tmp\n"
    assert killed
    assert failed == 7
    assert {"script.sh", "out.txt"} <= set(names)
    assert home == (
        "/home/user\n/home/user\nhello, written relative",
        ["hello.txt", "notes"],
        "AGENT114",
    )
    assert running


def test_open_internet_is_refused_and_templates_must_be_mapped_and_pinned():
    with pytest.raises(InvalidArgumentException) as raised:
        Sandbox.create(allow_internet_access=True)
    assert "allow_hosts" in raised.value.message
    for template in ("nowhere", "loose"):
        with pytest.raises(InvalidArgumentException) as raised:
            Sandbox.create(template)
        assert raised.value.code == "API008"


def test_async_sandbox_refuses_the_same():
    async def main():
        with pytest.raises(InvalidArgumentException) as raised:
            await AsyncSandbox.create(allow_internet_access=True)
        assert "allow_hosts" in raised.value.message
        for template in ("nowhere", "loose"):
            with pytest.raises(InvalidArgumentException) as raised:
                await AsyncSandbox.create(template)
            assert raised.value.code == "API008"

    asyncio.run(main())
