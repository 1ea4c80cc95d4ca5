"""Download faults injected at the registry: transient ones end repaired, persistent ones in the
SPEC's error; after every case no blob sits under a digest its bytes do not hash to."""

import hashlib
import os
import random

import pytest

from repair import names
from repair.retry import Retry
from repair.store import model_layer
from tests.conftest import assert_no_blob_under_a_wrong_digest

CHAT = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "test"}], "max_tokens": 2}
SIZE = 469440  # the tiny model's size; offsets below are spread across it
OFFSETS = sorted(random.Random(20261124).sample(range(1, SIZE), 24))


@pytest.fixture
def corrupted(serve, registry, models_dir):
    """A node whose model blob is corrupted, with a fast retry policy; checks the invariant after."""

    def start(delete=False, **env):
        s = serve(retry=Retry(total=5, backoff_factor=0.01), **env)
        layer = model_layer(s.node.store.read_manifest(names.parse("gpt-oss:7b")))
        path = s.node.store.blob_path(layer["digest"])
        if delete:
            os.unlink(path)
        else:
            with open(path, "r+b") as f:
                f.seek(SIZE // 2)
                f.write(b"\0" * 64)
        return s

    yield start
    assert_no_blob_under_a_wrong_digest(models_dir)


def assert_repaired(s):
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    layer = model_layer(s.node.store.read_manifest(names.parse("gpt-oss:7b")))
    with open(s.node.store.blob_path(layer["digest"]), "rb") as f:
        assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == layer["digest"]


@pytest.mark.parametrize("offset", OFFSETS)
def test_a_connection_reset_mid_body_is_resumed(corrupted, registry, offset):
    s = corrupted()
    registry.faults = [("reset", offset)]
    assert_repaired(s)
    first, resumed = [h.get("Range") for p, h in registry.requests if "/blobs/" in p][-2:]
    assert first is None
    # A reset throws away what was in flight, so the resume starts at or before the cut.
    assert int((resumed or "bytes=0-")[6:-1]) <= offset


@pytest.mark.parametrize("faults", [
    [("alter", 1000)],
    [("alter", SIZE - 64)],
    [("short", SIZE // 3)],
    [("status", 503), ("status", 502), ("status", 500)],
    [("status", 429, {"Retry-After": "1"})],
    [("reset", 5000), ("ignore_range",)],
    [("reset", 5000), ("bad_range",)],
    [("reset", 5000), ("reset", 100000), ("short", 200000)],
], ids=["altered-early", "altered-late", "short-body", "5xx-burst", "429-retry-after",
        "200-to-range", "wrong-content-range", "three-faults"])
def test_transient_faults_end_in_a_repaired_model(corrupted, registry, faults):
    s = corrupted()
    registry.faults = list(faults)
    assert_repaired(s)
    assert registry.faults == []


def test_a_stall_longer_than_the_read_timeout_is_retried(corrupted, registry):
    s = corrupted(LLM_REGISTRY_TIMEOUT_SECS="1")
    registry.faults = [("stall", SIZE // 2, 30)]
    assert_repaired(s)


@pytest.mark.parametrize("fault, message", [
    (("status", 404), "Model repair failed: model not found in registry"),
    (("status", 401), "Model repair failed: registry denied access"),
    (("status", 503), "Model repair failed: registry error"),
    (("redirect_loop",), "Model repair failed: redirect loop"),
    (("reset", 1000), "Model repair failed: network error"),
    (("alter", 1000), "Model repair failed: digest mismatch"),
], ids=["404", "401", "5xx", "redirect-loop", "resets", "altered"])
def test_persistent_faults_end_in_the_spec_error(corrupted, registry, fault, message):
    s = corrupted(delete=True)
    registry.always = fault
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 503, r.text
    assert r.json() == {"error": {"message": message, "type": "repair_failed",
                                  "code": "model_repair_error"}}
    assert "Retry-After" in r.headers
    layer = model_layer(s.node.store.read_manifest(names.parse("gpt-oss:7b")))
    assert not os.path.exists(s.node.store.blob_path(layer["digest"]))
