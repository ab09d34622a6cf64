"""The SDK's tests run against a real mvm: ``tests/sdk.rs`` in the mvm repository sets
``MVM_HOME`` (a kernel fetched), ``MVM_BIN``, ``MVM_RUNNER``, ``MVM_AGENT`` and
``MVM_TEST_IMAGE`` (a busybox image, ``oci:DIR@sha256:…``) and runs them. The server is
started by the SDK itself, on first use, and stopped at the end."""

import os
import signal

import pytest

from mvm import Sandbox
from mvm._api import shared


def pytest_collection_modifyitems(config, items):
    if "MVM_TEST_IMAGE" not in os.environ:
        raise pytest.UsageError(
            "MVM_TEST_IMAGE is not set: run these tests through `cargo test --test sdk`"
        )


@pytest.fixture(scope="session")
def image():
    return os.environ["MVM_TEST_IMAGE"]


@pytest.fixture(scope="session", autouse=True)
def server():
    yield
    api = shared()
    try:
        pid = api.json("GET", "/v1/health")["pid"]
    except Exception:
        return
    api.close()
    os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def sandbox(image):
    """One sandbox shared by the tests that can share it (a boot costs seconds)."""
    sandbox = Sandbox.create(
        image,
        envs={"GREETING": "hello"},
        metadata={"suite": "python"},
        timeout=600,
        secrets=["sdk-token"],
    )
    yield sandbox
    sandbox.kill()
