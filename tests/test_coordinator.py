"""The repair coordinator in process: auto-repair on a real waitress node (llama.cpp on the tiny
model, a loopback registry) of damaged blobs and manifests, the SPEC's errors when a repair
cannot finish, a blob llama.cpp cannot load though it is intact, a pull that keeps intact blobs,
and a bug in a repair answered 500 with its traceback logged."""

import json
import logging
import os
import threading

import pytest
import requests

import llmnode
from repair import names
from repair.coordinator import RepairCoordinator
from repair.errors import DownloadError, LLMNodeError
from repair.guard import IntegrityGuard
from repair.registry import RegistryClient
from repair.retry import Retry
from repair.store import Store, model_layer
from tests.conftest import (
    MODEL,
    Served,
    assert_error,
    blob_of,
    intact,
    pull,
    rot,
    served_on_a_full_disk,
    settings_for,
    wait_for,
    weights,
)
from tests.fakeregistry import MODEL_TYPE, make_manifest

CHAT = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "test"}], "max_tokens": 4}


def counting_loads(node):
    loads = []
    real = node.loader.read_weights

    def read_weights(path, gpu_layers):
        loads.append(path)
        return real(path, gpu_layers)

    node.loader.read_weights = read_weights
    return loads


def test_silent_corruption_of_a_loaded_model_is_repaired_before_the_answer(serve, registry):
    s = serve()
    loads = counting_loads(s.node)
    layer, path = weights(s.node)
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    served = registry.bytes_served[layer["digest"]]
    rot(path, keep_times=False)
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert registry.bytes_served[layer["digest"]] == served + layer["size"]
    assert intact(path, layer)
    # First use; then the changed file is checked and repaired before it is loaded again.
    assert loads == [path, path]
    assert s.node.pool.live() == 1


@pytest.mark.parametrize("damage", [
    lambda p: open(p, "wb").write(b"corrupted\n"),
    lambda p: os.truncate(p, os.path.getsize(p) // 2),
    lambda p: os.truncate(p, 0),
    lambda p: os.unlink(p),
], ids=["overwritten", "truncated", "zero-length", "deleted"])
def test_damaged_blobs_are_repaired_and_answered(serve, registry, damage):
    s = serve()
    layer, path = weights(s.node)
    damage(path)
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    assert intact(path, layer)


@pytest.mark.parametrize("damage", [
    lambda p: open(p, "wb").write(b"{not a manifest"),
    lambda p: open(p, "wb").write(json.dumps({"layers": []}).encode()),
    lambda p: os.unlink(p),
], ids=["garbage", "no-layers", "deleted"])
def test_a_corrupted_or_missing_manifest_is_fetched_again(serve, registry, damage):
    s = serve()
    path = s.node.store.manifest_path(names.parse("gpt-oss:7b"))
    damage(path)
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    assert open(path, "rb").read() == registry.manifests[("library/gpt-oss", "7b")]


def test_a_manifest_changed_in_place_after_use_is_caught(serve, registry):
    s = serve()
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    path = s.node.store.manifest_path(names.parse("gpt-oss:7b"))
    raw = open(path, "rb").read()
    st = os.stat(path)
    # Same size, same mtime, still a valid manifest: only its sha256 (and ctime) differ.
    tampered = raw.replace(b'"schemaVersion": 2', b'"schemaVersion": 3')
    assert tampered != raw and len(tampered) == len(raw)
    with open(path, "r+b") as f:
        f.write(tampered)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    assert open(path, "rb").read() == registry.manifests[("library/gpt-oss", "7b")]


def test_a_model_never_pulled_is_not_fetched(serve, registry):
    s = serve()
    before = len(registry.requests)
    r = s.post("/v1/chat/completions", dict(CHAT, model="other:1"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(registry.requests) == before


def test_a_load_failure_with_unchanged_times_leads_to_a_full_check_and_repair(serve, registry):
    s = serve()
    layer, path = weights(s.node)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    assert intact(path, layer)


def assert_spec_error(r, status, message, type_, code):
    assert r.status_code == status, r.text
    assert r.json() == {"error": {"message": message, "type": type_, "code": code}}


def test_an_unreachable_registry_is_503_repair_failed(serve, registry, caplog):
    serve()
    s = serve(LLM_REGISTRY_URL="http://127.0.0.1:9", retry=Retry(total=2))
    _, path = weights(s.node)
    rot(path, keep_times=False)
    r = s.post("/v1/chat/completions", CHAT)
    assert_spec_error(r, 503, "Model repair failed: network error", "repair_failed", "model_repair_error")
    assert int(r.headers["Retry-After"]) > 0
    assert not intact(path, weights(s.node)[0])
    assert "Auto-repair failed: gpt-oss:7b: network error (GET http://127.0.0.1:9/" in caplog.text


def test_a_slow_registry_past_the_timeout_is_504_and_the_next_attempt_resumes(serve, registry):
    serve()
    s = serve(LLM_REPAIR_TIMEOUT_SECS="2", LLM_REGISTRY_TIMEOUT_SECS="1")
    layer, path = weights(s.node)
    rot(path, keep_times=False)
    registry.gate = threading.Event()
    try:
        # The registry holds the body until the gate opens, so an answer at all is the timeout's.
        r = s.post("/v1/chat/completions", CHAT)
        assert_spec_error(r, 504, "Model repair timed out", "repair_timeout", "gateway_timeout")
        # The attempt itself gives up at its own deadline, keeping what it received.
        wait_for(lambda: not requests.get(s.url + "/health", timeout=5).json()["repairs"],
                 "the timed-out attempt to give up")
    finally:
        registry.gate.set()
        registry.gate = None
    kept = os.path.getsize(s.node.store.partial_path(layer["digest"]))
    assert 0 < kept < layer["size"]
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    blob_requests = [h for p, h in registry.requests if p.endswith(layer["digest"])]
    assert blob_requests[-1].get("Range") == "bytes=%d-" % kept
    assert intact(path, layer)


def test_auto_repair_off_answers_model_corrupted_and_downloads_nothing(serve, registry):
    serve()
    s = serve(LLM_AUTO_REPAIR="false")
    layer, path = weights(s.node)
    served = registry.bytes_served[layer["digest"]]
    rot(path, keep_times=False)
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["type"] == "model_corrupted" and err["code"] == "model_corrupted"
    assert "gpt-oss:7b" in err["message"] and "auto-repair is disabled" in err["message"]
    assert "Retry-After" in r.headers
    assert registry.bytes_served[layer["digest"]] == served
    assert not intact(path, layer)


def test_a_disk_too_full_for_the_repair_is_507_storage_full(registry, mount_tmpfs):
    with served_on_a_full_disk(registry, mount_tmpfs) as (s, layer):
        r = s.post("/v1/chat/completions", CHAT)
        assert_spec_error(r, 507, "Insufficient storage for model repair", "storage_full",
                          "insufficient_storage")
    assert not os.path.exists(s.node.store.partial_path(layer["digest"]))


def test_a_blob_llama_cpp_cannot_load_is_500_model_load_failed(serve, registry, models_dir):
    s = serve()
    raw, blobs = make_manifest([(MODEL_TYPE, b"GGUF" + b"\0" * 100)])
    store = Store(models_dir)
    for digest, data in blobs.items():
        with open(store.blob_path(digest), "wb") as f:
            f.write(data)
    store.write_manifest(names.parse("broken:1"), raw)
    requests_before = len(registry.requests)
    err = assert_error(s.post("/v1/chat/completions", dict(CHAT, model="broken:1")),
                       500, "server_error", "model_load_failed")
    assert "Failed to load" in err["message"] and "matches its digest" in err["message"]
    assert len(registry.requests) == requests_before


def test_pull_keeps_intact_blobs_and_fetches_broken_ones(registry, models_dir):
    store, client = Store(models_dir), RegistryClient(registry.url)
    guard = IntegrityGuard(store)
    ref = names.parse("gpt-oss:7b")
    pull(client, store, guard, ref)
    first = sum(registry.bytes_served.values())
    pull(client, store, guard, ref)
    assert sum(registry.bytes_served.values()) == first
    weights = model_layer(store.read_manifest(ref))
    with open(store.blob_path(weights["digest"]), "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 64)
    pull(client, store, guard, ref)
    assert sum(registry.bytes_served.values()) == first + weights["size"]


class _Exploding:
    """A registry client whose blob requests hit a bug."""

    def __init__(self, real):
        self.real = real

    def get_manifest(self, ref, digest=None):
        return self.real.get_manifest(ref, digest)

    def blob_bytes(self, *args, **kwargs):
        raise ZeroDivisionError("a bug")


def test_an_unexpected_error_in_a_repair_is_a_500_with_its_traceback_logged(pulled, registry, caplog):
    store = Store(pulled)
    guard = IntegrityGuard(store)
    coordinator = RepairCoordinator(store, _Exploding(RegistryClient(registry.url)), guard)
    ref = names.parse(MODEL)
    layer = model_layer(store.read_manifest(ref))
    with open(store.blob_path(layer["digest"]), "wb") as f:
        f.write(b"corrupted\n")
    with caplog.at_level(logging.ERROR), pytest.raises(LLMNodeError) as raised:
        coordinator.check_layer(ref, layer, gguf=True)
    assert not isinstance(raised.value, DownloadError)
    assert raised.value.status == 500 and raised.value.code == "internal_error"
    assert "ZeroDivisionError: a bug" in caplog.text and "Traceback" in caplog.text


def test_a_served_repair_with_a_bug_answers_500_internal_error(pulled, registry):
    node = llmnode.Node(settings_for(pulled, registry.url))
    node.repairs.client = _Exploding(node.client)
    layer, blob = blob_of(pulled)
    with open(blob, "wb") as f:
        f.write(b"corrupted\n")
    s = Served(node)
    try:
        r = s.post("/v1/chat/completions", CHAT)
    finally:
        s.close()
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "Retry-After" not in r.headers
