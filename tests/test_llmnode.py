import json
import os
import threading
import time

import pytest
import requests

import conf
import llmnode
from repair import names
from repair.guard import IntegrityGuard
from repair.registry import RegistryClient
from repair.store import Store, model_layer
from tests.conftest import pull
from tests.fakeregistry import MODEL_TYPE, make_manifest
from tests.tinymodel import write_tiny_gguf

CHAT = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def test_chat_completion_has_the_openai_shape(serve):
    r = serve().post("/v1/chat/completions", CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-oss:7b"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert 0 < body["usage"]["completion_tokens"] <= 4
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_consecutive_requests_without_max_tokens_are_answered(serve):
    s = serve()
    req = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "test"}]}
    for seed in range(4):
        r = s.post("/v1/chat/completions", dict(req, seed=seed))
        assert r.status_code == 200, r.text


def test_the_same_seed_gives_the_same_answer(serve):
    s = serve()
    req = dict(CHAT, seed=42, temperature=1.0, max_tokens=8)
    first = s.post("/v1/chat/completions", req).json()["choices"][0]["message"]["content"]
    second = s.post("/v1/chat/completions", req).json()["choices"][0]["message"]["content"]
    assert first == second


def test_streaming_sends_chunks_and_ends_with_done(serve):
    r = serve().post("/v1/chat/completions", dict(CHAT, stream=True))
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == "gpt-oss:7b" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_lists_the_store(serve):
    r = requests.get(serve().url + "/v1/models", timeout=10)
    assert r.json()["object"] == "list"
    assert [m["id"] for m in r.json()["data"]] == ["gpt-oss:7b"]


def test_health_does_not_wait_behind_a_generation(serve):
    s = serve()
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    entry = s.node.load("gpt-oss:7b")
    try:
        r = requests.get(s.url + "/health", timeout=5)
        models = requests.get(s.url + "/v1/models", timeout=5)
    finally:
        entry.release()
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert models.status_code == 200


def tree(root):
    """Every file under root with its size and modification time."""
    return sorted((os.path.join(d, f), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns)
                  for d, _, files in os.walk(root) for f in files)


def assert_error(r, status, type_, code):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    err = r.json()["error"]
    assert err["type"] == type_ and err["code"] == code and err["message"]
    return err


def test_unknown_routes_and_wrong_methods_are_json(serve):
    s = serve()
    assert_error(requests.get(s.url + "/nope", timeout=5), 404, "invalid_request_error", "not_found")
    r = requests.get(s.url + "/v1/chat/completions", timeout=5)
    assert_error(r, 405, "invalid_request_error", "method_not_allowed")
    assert "POST" in r.headers["Allow"]


def test_a_model_not_in_the_store_is_404_with_the_pull_command(serve):
    err = assert_error(serve().post("/v1/chat/completions", dict(CHAT, model="nothing:1")),
                       404, "invalid_request_error", "model_not_found")
    assert "nothing:1" in err["message"] and "python llmnode.py pull nothing:1" in err["message"]


def test_bodies_over_the_limit_are_413_json(serve):
    s = serve(LLM_MAX_BODY_BYTES="2048")
    big = dict(CHAT, messages=[{"role": "user", "content": "x" * 4000}])
    assert_error(s.post("/v1/chat/completions", big), 413, "invalid_request_error", "request_too_large")
    ok = dict(CHAT, messages=[{"role": "user", "content": "x" * 300}])
    assert s.post("/v1/chat/completions", ok).status_code == 200


def test_a_long_chat_over_bottles_100k_default_is_accepted(serve):
    long = dict(CHAT, messages=[{"role": "system", "content": "x" * 150_000},
                                {"role": "user", "content": "hi"}])
    r = serve().post("/v1/chat/completions", long)
    # The body is accepted; the tiny model's 512-token context then refuses the prompt.
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded")


def test_a_streamed_prompt_over_the_context_is_an_error_before_any_event(serve):
    long = dict(CHAT, stream=True, messages=[{"role": "user", "content": "x" * 2000}])
    assert_error(serve().post("/v1/chat/completions", long),
                 400, "invalid_request_error", "context_length_exceeded")


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_bodies_are_400(serve, data):
    r = serve().post("/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_request_error", "invalid_request")


@pytest.mark.parametrize("change, code", [
    ({"model": None}, "invalid_request"),
    ({"model": "../../etc/passwd"}, "invalid_model_name"),
    ({"messages": []}, "invalid_request"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "invalid_request"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_request"),
    ({"max_tokens": 0}, "invalid_request"),
    ({"max_tokens": "10"}, "invalid_request"),
    ({"temperature": 3}, "invalid_request"),
    ({"top_p": -1}, "invalid_request"),
    ({"stop": [1]}, "invalid_request"),
    ({"stream": "yes"}, "invalid_request"),
])
def test_invalid_fields_are_400(serve, models_dir, change, code):
    s = serve()
    before = tree(models_dir)
    r = s.post("/v1/chat/completions", dict(CHAT, **change))
    assert_error(r, 400, "invalid_request_error", code)
    assert tree(models_dir) == before


def test_content_parts_and_developer_role_are_accepted(serve):
    req = dict(CHAT, messages=[{"role": "developer", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert serve().post("/v1/chat/completions", req).status_code == 200


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


def test_least_recently_used_model_leaves_first(tmp_path):
    paths = [str(write_tiny_gguf(tmp_path / ("m%d.gguf" % i), seed=i)) for i in range(3)]
    loads = []

    def loader(path):
        loads.append(path)
        return llmnode.load_llama(path, conf.load(environ={"LLM_CTX_SIZE": "256",
                                                           "LLM_CPU_THREADS": "1"}))

    pool = llmnode.ModelPool(capacity=2)
    for p in (paths[0], paths[1], paths[0], paths[2]):
        pool.acquire(p, lambda p=p: loader(p)).release()
    assert sorted(pool.loaded()) == sorted([paths[0], paths[2]])
    assert loads == [paths[0], paths[1], paths[2]]


def test_store_paths_come_only_from_validated_names(models_dir):
    store = Store(models_dir)
    raw, _ = make_manifest([(MODEL_TYPE, b"GGUF")])
    store.write_manifest(names.parse("me/m:1"), raw)
    layer = model_layer(store.read_manifest(names.parse("me/m:1")))
    assert os.path.dirname(store.blob_path(layer["digest"])) == os.path.join(models_dir, "blobs")


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


def test_the_model_lock_is_handed_over_in_arrival_order():
    lock = llmnode.FairLock()
    assert lock.acquire()
    order = []

    def waiter(name):
        assert lock.acquire(timeout=30)
        order.append(name)
        lock.release()

    threads = []
    for i, name in enumerate("abcde"):
        t = threading.Thread(target=waiter, args=(name,))
        t.start()
        threads.append(t)
        # The next thread starts only once this one is queued.
        deadline = time.monotonic() + 10
        while lock.waiting() != i + 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(30)
    assert order == list("abcde")
    assert lock.acquire(timeout=0)  # free again once everyone has been


def test_a_timed_out_waiter_leaves_the_queue():
    lock = llmnode.FairLock()
    lock.acquire()
    assert not lock.acquire(timeout=0.01)
    assert lock.waiting() == 0
    lock.release()
    assert lock.acquire(timeout=0)
