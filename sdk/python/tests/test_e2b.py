"""E2B-style programs, unchanged but for their import line (``from e2b import …`` became
``from mvm.compat.e2b import …``): the quickstart patterns on mvm, and what mvm refuses to
widen."""

import os
from pathlib import Path

import pytest

from mvm.compat.e2b import CommandExitException, InvalidArgumentException, Sandbox


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
        return saved, killed, failed, names, sandbox.is_running()
    # ---


def test_the_quickstart_runs_on_mvm():
    saved, killed, failed, names, running = e2b_quickstart()
    assert saved == "hi from /tmp\n"
    assert killed
    assert failed == 7
    assert {"script.sh", "out.txt"} <= set(names)
    assert running


def test_open_internet_is_refused_and_templates_must_be_mapped_and_pinned():
    with pytest.raises(InvalidArgumentException) as raised:
        Sandbox.create(allow_internet_access=True)
    assert "allow_hosts" in raised.value.message
    for template in ("nowhere", "loose"):
        with pytest.raises(InvalidArgumentException) as raised:
            Sandbox.create(template)
        assert raised.value.code == "API008"
