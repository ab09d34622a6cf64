"""`mvm mcp` driven by the official Python MCP client (`mcp` on PyPI): initialize, list the
tools, then sandboxes created, used and removed through them. Run by tests/mcp.rs with
MVM_BIN, MVM_HOME, MVM_TEST_IMAGE (allowed, the default) and MVM_TEST_DENIED (not allowed)."""

import asyncio
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

IMAGE = os.environ["MVM_TEST_IMAGE"]
DENIED = os.environ["MVM_TEST_DENIED"]


def text(result):
    return "".join(getattr(block, "text", "") for block in result.content)


async def call(session, name, arguments):
    result = await session.call_tool(name, arguments)
    assert not result.is_error, f"{name}: {text(result)}"
    return result.structured_content


async def refused(session, name, arguments, code):
    result = await session.call_tool(name, arguments)
    assert result.is_error, f"{name} was not refused: {result}"
    assert result.structured_content is None, result
    assert text(result).startswith(code), text(result)
    return text(result)


async def main():
    server = StdioServerParameters(
        command=os.environ["MVM_BIN"],
        args=["mcp", "--default-image", IMAGE, "--max-sandboxes", "2"],
        env={k: v for k, v in os.environ.items() if k.startswith(("MVM_", "RUST_"))},
    )
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=600) as session:
            init = await session.initialize()
            assert init.server_info.name == "mvm", init
            # The version both offered, as the spec's negotiation has it.
            assert init.protocol_version == "2025-11-25", init
            tools = (await session.list_tools()).tools
            names = sorted(tool.name for tool in tools)
            assert names == sorted([
                "sandbox_create", "sandbox_run_code", "sandbox_exec", "sandbox_files_read",
                "sandbox_files_write", "sandbox_files_list", "sandbox_list", "sandbox_pause",
                "sandbox_resume", "sandbox_stop", "sandbox_remove",
            ]), names
            for tool in tools:
                assert tool.input_schema.get("additionalProperties") is False, tool.name
                assert tool.output_schema, tool.name

            # A program in a fresh sandbox of the default image, removed after.
            once = await call(session, "sandbox_run_code",
                              {"language": "shell", "code": "echo one shot; exit 4"})
            assert once["exit_code"] == 4 and once["stdout"] == "one shot\n", once
            assert once["audit_id"].startswith("sha256:"), once

            made = await call(session, "sandbox_create",
                              {"image": IMAGE, "labels": {"suite": "python"}})
            sandbox = made["sandbox_id"]
            assert made["state"] == "running" and made["labels"] == {"suite": "python"}, made
            # Restored from the boot snapshot the one-shot's launch of the same plan made.
            assert len(made.get("boot_snapshot", "")) == 64, made
            listed = await call(session, "sandbox_list", {"labels": {"suite": "python"}})
            assert [s["sandbox_id"] for s in listed["sandboxes"]] == [sandbox], listed

            wrote = await call(session, "sandbox_files_write",
                               {"sandbox_id": sandbox, "path": "/tmp/note", "content": "mvm"})
            assert wrote["size"] == 3, wrote
            ran = await call(session, "sandbox_run_code",
                             {"sandbox_id": sandbox, "language": "shell",
                              "code": 'echo "hello from $(cat /tmp/note)"'})
            assert ran["exit_code"] == 0 and ran["stdout"] == "hello from mvm\n", ran
            read = await call(session, "sandbox_files_read",
                              {"sandbox_id": sandbox, "path": "/tmp/note"})
            assert read["content"] == "mvm", read
            entries = await call(session, "sandbox_files_list",
                                 {"sandbox_id": sandbox, "path": "/tmp"})
            assert "note" in [e["name"] for e in entries["entries"]], entries
            # A non-zero exit is a result, not an error.
            failed = await call(session, "sandbox_exec",
                                {"sandbox_id": sandbox,
                                 "command": ["sh", "-c", "cat /tmp/note; echo oops >&2; exit 3"]})
            assert failed["exit_code"] == 3, failed
            assert failed["stdout"] == "mvm" and failed["stderr"] == "oops\n", failed
            assert not failed["timed_out"] and not failed["truncated"], failed

            # Refusals are tool errors with mvm's code.
            await refused(session, "sandbox_create", {"image": DENIED}, "MCP002")
            await refused(session, "sandbox_exec",
                          {"sandbox_id": sandbox, "command": ["x"] * 300}, "MCP001")
            unknown = await refused(session, "sandbox_exec",
                                    {"sandbox_id": sandbox, "command": ["true"], "priority": 1},
                                    "MCP001")
            assert "priority" in unknown, unknown
            await refused(session, "sandbox_files_read",
                          {"sandbox_id": sandbox, "path": "/etc/passwd"}, "AGENT")
            await refused(session, "sandbox_exec",
                          {"sandbox_id": "mvm-builder", "command": ["true"]}, "MCP004")

            paused = await call(session, "sandbox_pause", {"sandbox_id": sandbox})
            assert paused["state"] == "paused", paused
            resumed = await call(session, "sandbox_resume", {"sandbox_id": sandbox})
            assert resumed["state"] == "running", resumed
            again = await call(session, "sandbox_exec",
                               {"sandbox_id": sandbox, "command": ["cat", "/tmp/note"]})
            assert again["stdout"] == "mvm", again
            stopped = await call(session, "sandbox_stop", {"sandbox_id": sandbox})
            assert stopped["state"] == "stopped", stopped

            removed = await call(session, "sandbox_remove", {"sandbox_id": sandbox})
            assert removed == {"sandbox_id": sandbox}, removed
            listed = await call(session, "sandbox_list", {})
            assert listed["sandboxes"] == [], listed
    print("python mcp client: ok")


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
