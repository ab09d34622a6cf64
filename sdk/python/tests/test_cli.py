"""``mvm sandbox``: the API's sandboxes from the shell — the same objects, the same clock."""

import json
import os
import subprocess
from datetime import datetime, timezone


def mvm(*args):
    """``mvm --json ARGS``: its exit status and its JSON document."""
    done = subprocess.run(
        [os.environ["MVM_BIN"], "--json", *args], capture_output=True, text=True, timeout=60
    )
    return done.returncode, json.loads(done.stdout)


def seconds_left(expires_at):
    at = datetime.strptime(expires_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return (at - datetime.now(timezone.utc)).total_seconds()


def test_the_cli_lists_by_label_and_sets_the_timeout_the_api_keeps(sandbox):
    status, listed = mvm("sandbox", "ls", "--label", "suite=python", "--state", "running")
    assert status == 0
    mine = [s for s in listed["sandboxes"] if s["id"] == sandbox.sandbox_id]
    assert mine and mine[0]["metadata"]["suite"] == "python"
    assert mvm("sandbox", "ls", "--label", "suite=elsewhere") == (0, {"sandboxes": []})

    status, set_ = mvm("sandbox", "set-timeout", sandbox.sandbox_id, "7m")
    assert status == 0
    assert 400 < seconds_left(set_["expires_at"]) <= 420
    # The API sees the clock the CLI set.
    assert sandbox.get_info().expires_at == set_["expires_at"]
    status, never = mvm("sandbox", "set-timeout", sandbox.sandbox_id, "0")
    assert (status, never.get("expires_at")) == (0, None)
    assert sandbox.get_info().expires_at is None
    sandbox.set_timeout(600)

    status, refused = mvm("sandbox", "set-timeout", sandbox.sandbox_id, "2days")
    assert (status, refused["error"]["code"]) == (65, "API001")
    status, missing = mvm("sandbox", "kill", "no-such-sandbox")
    assert (status, missing["error"]["code"]) == (65, "RUN036")
