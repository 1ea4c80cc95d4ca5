"""Several writers on one store: a serving node and the commands, threads and other processes,
Ollama's partial files, and a tag that moved upstream (the records file they share: test_records)."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import requests

from repair import names
from repair.records import StoreRecords
from repair.store import Store
from tests.conftest import (
    MODEL,
    ROOT,
    assert_no_blob_under_a_wrong_digest,
    blob_of,
    node_env,
    run_cli,
    wait_for,
)
from tests.tinymodel import write_tiny_gguf

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "test"}], "max_tokens": 2}


def test_the_serving_node_and_the_repair_command_repair_one_blob_together(
        pulled, registry, start_node):
    """20 rounds, damage at varied offsets; in every other round the registry holds the node's
    download half-way until the command is seen waiting for the node's install, so the two
    certainly overlap; in the others they meet however they happen to."""
    layer, blob = blob_of(pulled)
    env = node_env(pulled, registry.url)
    node = start_node(env)
    waits = 0
    for round_ in range(20):
        offset = (round_ * 23_459) % (layer["size"] - 64)
        with open(blob, "r+b") as f:
            f.seek(offset)
            f.write(b"\x00" * 64 if round_ % 2 else b"corrupted\n")
        before = registry.bytes_served[layer["digest"]]
        gate = registry.gate = threading.Event() if round_ % 2 else None
        answer = {}
        asking = threading.Thread(target=lambda into=answer: into.update(
            r=requests.post(node.url + "/v1/chat/completions", json=CHAT, timeout=120)))
        asking.start()
        if gate is not None:
            wait_for(lambda at=before: registry.bytes_served[layer["digest"]] > at, "the node's download")
        command = subprocess.Popen([sys.executable, os.path.join(ROOT, "llmnode.py"), "repair", MODEL],
                                   env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        err = ""
        if gate is not None:
            for line in command.stderr:  # the command logs when the node's lock makes it wait
                err += line
                if "being written by another writer" in line:
                    break
            gate.set()
        out, rest = command.communicate(timeout=120)
        err += rest
        asking.join(120)
        registry.gate = None
        assert answer["r"].status_code == 200, answer["r"].text
        assert command.returncode == 0, err
        assert ("repaired" in out or "intact" in out), out
        assert assert_no_blob_under_a_wrong_digest(pulled) == 2
        waited = "installed by another writer" in err
        assert waited or gate is None, err
        waits += waited
        # However the two met, the blob came over the wire at most twice (range repair or whole).
        assert registry.bytes_served[layer["digest"]] - before <= 2 * layer["size"]
    print("20 rounds: %d in which the command waited for the node's install" % waits)
    assert waits >= 10


def test_two_threads_and_a_command_repair_one_blob(pulled, registry, serve):
    s = serve()
    layer, blob = blob_of(pulled)
    registry.rate = 1 << 20
    env = node_env(pulled, registry.url)
    for round_ in range(5):
        with open(blob, "wb") as f:
            f.write(b"corrupted %d\n" % round_)
        command = subprocess.Popen([sys.executable, os.path.join(ROOT, "llmnode.py"), "repair", MODEL],
                                   env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        results = []

        def ask(into=results):
            into.append(s.post("/v1/chat/completions", CHAT).status_code)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        _, err = command.communicate(timeout=120)
        assert results == [200, 200]
        assert command.returncode == 0, err
        assert assert_no_blob_under_a_wrong_digest(pulled) == 2


def test_an_ollama_partial_beside_our_blob_is_neither_deleted_nor_taken_as_data(pulled, registry, serve):
    s = serve()
    layer, blob = blob_of(pulled)
    # Ollama preallocates `<blob>-partial` to the full size and keeps its parts in `-partial-N`.
    theirs = blob + "-partial"
    with open(theirs, "wb") as f:
        f.truncate(layer["size"])
    with open(theirs + "-0", "w") as f:
        json.dump({"N": 0, "Offset": 0, "Size": layer["size"], "Completed": 0}, f)
    stamps = {p: os.stat(p).st_mtime_ns for p in (theirs, theirs + "-0")}
    with open(blob, "wb") as f:
        f.write(b"corrupted\n")
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    assert assert_no_blob_under_a_wrong_digest(pulled) == 2
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    assert open(theirs, "rb").read() == b"\0" * layer["size"]
    assert not s.node.store.partial_path(layer["digest"]).startswith(s.node.store.blobs_dir)


@pytest.fixture
def moved_tag(registry, models_dir, tmp_path):
    """gpt-oss:7b pulled; then upstream, the tag moves to different weights."""
    result = run_cli("pull", MODEL, env=node_env(models_dir, registry.url))
    assert result.returncode == 0, result.stderr
    ref = names.parse(MODEL)
    store = Store(models_dir)
    pinned = store.read_manifest_raw(ref)
    other = write_tiny_gguf(tmp_path / "v2.gguf", seed=7).read_bytes()
    registry.add_model("library/gpt-oss", "7b", other)
    return store, ref, pinned


def test_a_broken_manifest_is_repaired_with_the_pinned_one_even_after_the_tag_moved(
        moved_tag, registry, serve):
    store, ref, pinned = moved_tag
    with open(store.manifest_path(ref), "wb") as f:
        f.write(b"{broken")
    s = serve()
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    assert store.read_manifest_raw(ref) == pinned
    assert any("/manifests/sha256:%s" % hashlib.sha256(pinned).hexdigest() in path
               for path, _ in registry.requests)


def test_without_the_pinned_manifest_upstream_the_node_refuses_rather_than_serve_the_new_tag(
        moved_tag, registry, serve):
    store, ref, pinned = moved_tag
    registry.manifests_by_digest = {k: v for k, v in registry.manifests_by_digest.items()
                                    if v != pinned}
    with open(store.manifest_path(ref), "wb") as f:
        f.write(b"{broken")
    s = serve()
    r = s.post("/v1/chat/completions", CHAT)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_repair_error"
    assert store.read_manifest_raw(ref) == b"{broken"


def test_pull_moves_to_the_new_tag_and_says_so(moved_tag, registry, models_dir):
    store, ref, pinned = moved_tag
    result = run_cli("pull", MODEL, env=node_env(models_dir, registry.url))
    assert result.returncode == 0, result.stderr
    assert "the tag moved (was sha256:%s)" % hashlib.sha256(pinned).hexdigest() in result.stdout
    new = store.read_manifest_raw(ref)
    assert new != pinned
    assert StoreRecords(models_dir).manifest_digest(ref) == hashlib.sha256(new).hexdigest()


def test_a_store_without_a_pin_uses_the_tag_once_and_pins_it(pulled, registry, serve, caplog):
    store = Store(pulled)
    ref = names.parse(MODEL)
    os.unlink(os.path.join(pulled, ".llmnode", "verified.json"))  # as Ollama would leave it
    raw = store.read_manifest_raw(ref)
    s = serve()
    with caplog.at_level(logging.WARNING):
        assert s.post("/v1/chat/completions", CHAT).status_code == 200
    assert StoreRecords(pulled).manifest_digest(ref) == hashlib.sha256(raw).hexdigest()


