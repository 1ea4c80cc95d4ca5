"""Range repair on a blob of several chunks: only the damaged chunks cross the wire."""

import os

import pytest

from repair import names
from repair.chunks import CHUNK_SIZE
from repair.coordinator import RepairCoordinator
from repair.guard import IntegrityGuard
from repair.registry import RegistryClient
from repair.store import Store, model_layer
from tests.conftest import intact, pull
from tests.fakeregistry import FakeRegistry

REF = names.parse("big:1")


@pytest.fixture
def big(tmp_path):
    """A 5-chunk (40 MiB) model pulled into a store from a loopback registry."""
    registry = FakeRegistry().start()
    registry.add_model("library/big", "1", b"GGUF" + os.urandom(5 * CHUNK_SIZE - 4))
    store = Store(str(tmp_path / "models"))
    client = RegistryClient(registry.url)
    guard = IntegrityGuard(store)
    pull(client, store, guard, REF)
    layer = model_layer(store.read_manifest(REF))
    yield registry, store, RepairCoordinator(store, client, guard), layer
    registry.stop()


def damage(store, layer, offset, n=64 << 10):
    with open(store.blob_path(layer["digest"]), "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(n))


def test_a_64k_corruption_is_repaired_by_fetching_at_most_two_chunks(big):
    registry, store, repairs, layer = big
    served = registry.bytes_served[layer["digest"]]
    damage(store, layer, 2 * CHUNK_SIZE - 32 * 1024)  # straddles chunks 1 and 2
    assert repairs.ensure(REF).repaired
    assert intact(store.blob_path(layer["digest"]), layer)
    assert registry.bytes_served[layer["digest"]] - served == 2 * CHUNK_SIZE
    ranges = [h.get("Range") for p, h in registry.requests if p.endswith(layer["digest"])][-2:]
    assert ranges == ["bytes=%d-%d" % (CHUNK_SIZE, 2 * CHUNK_SIZE - 1),
                      "bytes=%d-%d" % (2 * CHUNK_SIZE, 3 * CHUNK_SIZE - 1)]
    assert repairs.metrics.get("llmnode_download_bytes_total") == 2 * CHUNK_SIZE


def test_a_registry_that_sends_wrong_chunk_bytes_leads_to_a_full_download(big):
    registry, store, repairs, layer = big
    served = registry.bytes_served[layer["digest"]]
    damage(store, layer, 3 * CHUNK_SIZE + 100)
    registry.faults = [("alter", 3 * CHUNK_SIZE + 5000)]
    assert repairs.ensure(REF).repaired
    assert intact(store.blob_path(layer["digest"]), layer)
    assert registry.bytes_served[layer["digest"]] - served == CHUNK_SIZE + layer["size"]


def test_a_truncated_blob_is_downloaded_whole(big):
    registry, store, repairs, layer = big
    served = registry.bytes_served[layer["digest"]]
    os.truncate(store.blob_path(layer["digest"]), CHUNK_SIZE)
    assert repairs.ensure(REF).repaired
    assert intact(store.blob_path(layer["digest"]), layer)
    assert registry.bytes_served[layer["digest"]] - served == layer["size"]


def test_a_registry_that_ignores_ranges_leads_to_a_full_download(big):
    registry, store, repairs, layer = big
    damage(store, layer, 3 * CHUNK_SIZE + 100)
    registry.ignore_range = True
    assert repairs.ensure(REF).repaired
    assert intact(store.blob_path(layer["digest"]), layer)
