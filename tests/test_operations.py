"""The store operations (repair/operations.py): delete and copy, against a real node process and a
loopback registry, never race a pull or a repair of a blob they share."""

import json
import os
import threading

import pytest
import requests

from repair import operations
from repair.records import StoreRecords
from repair.store import Store, named_in
from tests.conftest import blob_of, node_env, run_cli, wait_for

SHARED_SYSTEM = ("application/vnd.ollama.image.system", b"You are model A.")
OTHER_SYSTEM = ("application/vnd.ollama.image.system", b"You are model B, the other one.")


def missing_blobs(models_dir):
    """Blobs a manifest in the store names that are not there."""
    store = Store(models_dir)
    return [(str(ref), d) for ref in store.models()
            for d in named_in(store.read_manifest_raw(ref)) if not os.path.exists(store.blob_path(d))]


def api_pull(url, name):
    """Pull through the node's /api/pull (not conftest's in-process `pull`)."""
    return requests.post(url + "/api/pull", json={"model": name, "stream": False}, timeout=120)


def test_deleting_a_model_while_another_sharing_its_weights_is_pulled_keeps_them(
        registry, tiny_gguf, models_dir, start_node):
    registry.add_model("library/a", "1", tiny_gguf, extra_layers=[SHARED_SYSTEM])
    registry.add_model("library/b", "1", tiny_gguf, extra_layers=[OTHER_SYSTEM])
    b_system = blob_of_registry(registry, "library/b", "system")
    env = node_env(models_dir, registry.url)
    node = start_node(env)
    for round_ in range(20):
        assert api_pull(node.url, "a:1").json() == {"status": "success"}
        gated = round_ % 2 == 0
        if gated:
            # B's pull has checked the shared weights and is fetching its own layer when A goes.
            registry.gate = threading.Event()
        pulled = []
        puller = threading.Thread(target=lambda into=pulled: into.append(api_pull(node.url, "b:1")))
        puller.start()
        try:
            if gated:
                wait_for(lambda: b_system in [r["digest"] for r in requests.get(
                    node.url + "/health", timeout=5).json()["repairs"]], "B's pull reached its layer")
            r = requests.delete(node.url + "/api/delete", json={"model": "a:1"}, timeout=120)
            assert r.status_code == 200, r.text
        finally:
            if gated:
                registry.gate.set()
                registry.gate = None
        puller.join(120)
        assert pulled[0].json() == {"status": "success"}, pulled[0].text
        assert missing_blobs(models_dir) == [], "round %d" % round_
        assert [str(ref) for ref in Store(models_dir).models()] == ["b:1"]
        verify = run_cli("verify", env=env)
        assert verify.returncode == 0, verify.stdout
        r = requests.delete(node.url + "/api/delete", json={"model": "b:1"}, timeout=120)
        assert r.status_code == 200, r.text
    assert os.listdir(os.path.join(models_dir, "blobs")) == []
    assert os.listdir(os.path.join(models_dir, ".llmnode", "chunks")) == []
    records = StoreRecords(models_dir).snapshot()
    assert records["blobs"] == {} and records["tables"] == {} and records["manifests"] == {}
    assert records["pulls"] == {}


def blob_of_registry(registry, repository, kind):
    manifest = json.loads(registry.manifests[(repository, "1")])
    return next(la["digest"] for la in manifest["layers"] if la["mediaType"].endswith("." + kind))


def test_a_delete_during_a_repair_of_the_same_model_waits_for_it_and_leaves_no_orphan(
        pulled, registry, start_node):
    layer, blob = blob_of(pulled)
    with open(blob, "wb") as f:
        f.write(b"corrupted\n")
    node = start_node(node_env(pulled, registry.url))
    registry.gate = threading.Event()
    answers, deleted = [], []
    try:
        asker = threading.Thread(target=lambda: answers.append(requests.post(
            node.url + "/v1/chat/completions", timeout=120, json={
                "model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})))
        asker.start()
        wait_for(lambda: requests.get(node.url + "/health", timeout=5).json()["repairs"],
                 "the repair started")
        deleter = threading.Thread(target=lambda: deleted.append(requests.delete(
            node.url + "/api/delete", json={"model": "gpt-oss:7b"}, timeout=120)))
        deleter.start()
        wait_for(lambda: "delete of model gpt-oss:7b waits for blob %s being installed" % layer["digest"]
                 in node.log(), "the delete waits for the repair's lock")
    finally:
        registry.gate.set()
        registry.gate = None
    asker.join(120)
    deleter.join(120)
    assert deleted[0].status_code == 200, deleted[0].text
    assert answers[0].status_code in (200, 404), answers[0].text  # answered, or the model is gone
    log = node.log()
    assert log.index("Auto-repair completed: gpt-oss:7b") < log.index("deleted model gpt-oss:7b")
    store = Store(pulled)
    assert store.models() == [] and os.listdir(store.blobs_dir) == []
    assert not os.path.exists(store.partial_path(layer["digest"]))
    records = StoreRecords(pulled).snapshot()
    assert records["blobs"] == {} and records["tables"] == {} and records["manifests"] == {}
    assert os.listdir(os.path.join(pulled, ".llmnode", "chunks")) == []


def test_a_repair_that_starts_after_its_model_was_deleted_installs_nothing(pulled, registry):
    import llmnode
    from repair import names
    from tests.conftest import settings_for

    node = llmnode.Node(settings_for(pulled, registry.url))
    ref = names.parse("gpt-oss:7b")
    manifest = node.repairs.manifest(ref)
    operations.delete(node.repairs, ref)
    weights = next(la for la in manifest["layers"] if la["mediaType"].endswith(".model"))
    with pytest.raises(llmnode.ModelNotFound):
        node.repairs.check_layer(ref, weights, gguf=True)
    assert os.listdir(node.store.blobs_dir) == []


def test_copy_pins_the_copy_and_a_delete_of_the_source_keeps_the_shared_blobs(pulled, registry, start_node):
    node = start_node(node_env(pulled, registry.url))
    r = requests.post(node.url + "/api/copy", json={"source": "gpt-oss:7b", "destination": "mine:1"},
                      timeout=30)
    assert r.status_code == 200, r.text
    records = StoreRecords(pulled)
    assert records.manifest_digest("mine:1") == records.manifest_digest("gpt-oss:7b") is not None
    r = requests.delete(node.url + "/api/delete", json={"model": "gpt-oss:7b"}, timeout=30)
    assert r.status_code == 200, r.text
    assert missing_blobs(pulled) == []
    assert run_cli("verify", "mine:1", env=node_env(pulled, registry.url)).returncode == 0
