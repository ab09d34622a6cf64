"""Encrypted volumes through the API: what one sandbox wrote is there for the next; one
sandbox at a time; read-only when asked; a malformed one refused before anything starts."""

import os
import subprocess

import pytest

from mvm import CommandExitException, InvalidArgumentException, Sandbox, SandboxException


def test_a_volume_keeps_what_one_sandbox_wrote_for_the_next(image):
    name = "sdk-work"
    subprocess.run(
        [os.environ["MVM_BIN"], "--json", "volume", "create", name, "--size", "32M"],
        check=True,
        capture_output=True,
    )
    first = Sandbox.create(image, volumes=[f"{name}:/work"], timeout=300)
    try:
        first.commands.run("echo kept > /work/note; sync")
        # Attached to one sandbox at a time.
        with pytest.raises(SandboxException) as raised:
            Sandbox.create(image, volumes=[f"{name}:/work"], timeout=300)
        assert raised.value.code == "RUN062", raised.value
    finally:
        first.kill()
    # Read-only: the journal the first left (its VM ended without unmounting) is replayed.
    second = Sandbox.create(image, volumes=[f"{name}:/work:ro"], timeout=300)
    try:
        assert second.commands.run("cat /work/note").stdout == "kept\n"
        with pytest.raises(CommandExitException):
            second.commands.run("echo more > /work/note")
    finally:
        second.kill()


@pytest.mark.parametrize("volume", ["no-path", "work:relative", "Bad Name:/work"])
def test_a_malformed_volume_is_refused_before_anything_starts(image, volume):
    with pytest.raises(InvalidArgumentException):
        Sandbox.create(image, volumes=[volume])
