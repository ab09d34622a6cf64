"""Files: written and read as text, bytes and streams (64 MiB, SHA-256 equal), listed,
described, made, renamed and removed — with the agent's rules and codes."""

import hashlib
import io

import pytest

from mvm import InvalidArgumentException, NotFoundException, WriteEntry


def test_text_and_bytes_round_trip_and_commands_see_them(sandbox):
    info = sandbox.files.write("/tmp/hello.txt", "héllo\n")
    assert (info.path, info.size, info.name) == ("/tmp/hello.txt", 7, "hello.txt")
    assert sandbox.files.read("/tmp/hello.txt") == "héllo\n"
    assert sandbox.commands.run("cat /tmp/hello.txt").stdout == "héllo\n"
    binary = bytes(range(256)) * 4
    sandbox.files.write("/tmp/bin.dat", binary, mode=0o600)
    assert sandbox.files.read("/tmp/bin.dat", format="bytes") == binary
    assert sandbox.files.get_info("/tmp/bin.dat").mode == 0o600
    written = sandbox.files.write(
        [WriteEntry("/tmp/a.txt", "a"), WriteEntry("/tmp/b.txt", b"bb")]
    )
    assert [w.size for w in written] == [1, 2]


def test_64_mib_streams_both_ways_unchanged(sandbox):
    size = 64 << 20
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    source = io.BytesIO(b"".join(block[i:] + block[:i] for i in range(64)))
    expected = hashlib.sha256(source.getvalue()).hexdigest()
    written = sandbox.files.write("/tmp/big.bin", source)
    assert (written.size, written.sha256) == (size, "sha256:" + expected)
    digest = hashlib.sha256()
    total = 0
    for chunk in sandbox.files.read("/tmp/big.bin", format="stream"):
        digest.update(chunk)
        total += len(chunk)
    assert (total, digest.hexdigest()) == (size, expected)
    in_guest = sandbox.commands.run("sha256sum /tmp/big.bin").stdout.split()[0]
    assert in_guest == expected
    sandbox.files.remove("/tmp/big.bin")


def test_directories_are_made_listed_renamed_and_removed(sandbox):
    assert sandbox.files.make_dir("/tmp/tree")
    assert not sandbox.files.make_dir("/tmp/tree")
    sandbox.files.make_dir("/tmp/tree/sub")
    sandbox.files.write("/tmp/tree/sub/leaf.txt", "leaf")
    sandbox.files.write("/tmp/tree/top.txt", "top")
    shallow = {e.path: e.type for e in sandbox.files.list("/tmp/tree")}
    assert shallow == {"/tmp/tree/sub": "directory", "/tmp/tree/top.txt": "file"}
    deep = {e.path for e in sandbox.files.list("/tmp/tree", depth=2)}
    assert "/tmp/tree/sub/leaf.txt" in deep
    moved = sandbox.files.rename("/tmp/tree/top.txt", "/tmp/tree/moved.txt")
    assert (moved.path, moved.size) == ("/tmp/tree/moved.txt", 3)
    assert sandbox.files.exists("/tmp/tree/moved.txt")
    assert not sandbox.files.exists("/tmp/tree/top.txt")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.remove("/tmp/tree")
    sandbox.files.remove("/tmp/tree", recursive=True)
    assert not sandbox.files.exists("/tmp/tree")


def test_what_the_agent_refuses_is_an_error_with_its_code(sandbox):
    with pytest.raises((NotFoundException, InvalidArgumentException)) as raised:
        sandbox.files.read("/tmp/no-such-file")
    assert raised.value.code.startswith("AGENT")
    # Outside the copy root, and through a symlink: refused, never followed.
    with pytest.raises(InvalidArgumentException) as raised:
        sandbox.files.read("/etc/passwd")
    assert raised.value.code == "AGENT107"
    sandbox.commands.run("ln -sf /etc /tmp/link")
    with pytest.raises(InvalidArgumentException) as raised:
        sandbox.files.write("/tmp/link/x", "x")
    assert raised.value.code == "AGENT107"
