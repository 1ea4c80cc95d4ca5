"""Parallel ranged download: parts over several connections, resumed from the progress record."""

import itertools
import json
import os
import subprocess
import sys
import threading

import pytest

from repair import names, parts
from repair.chunks import hash_file
from repair.download import DownloadState, fetch_blob
from repair.errors import InsufficientStorage, RepairTimeout
from repair.registry import RegistryClient
from repair.store import Store
from tests.conftest import no_sleep, wait_for
from tests.fakeregistry import digest_of

REF = names.parse("gpt-oss:7b")
SIZE = 20 << 20
PART_MIN = 1 << 20


@pytest.fixture(scope="module")
def big():
    # Random bytes: any misplaced or repeated part changes the digest.
    return os.urandom(SIZE)


@pytest.fixture
def setup(registry, tmp_path, big):
    digest = digest_of(big)
    registry.blobs[digest] = big
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": SIZE}
    return Store(str(tmp_path / "models")), RegistryClient(registry.url), layer


def blob_requests(registry):
    with registry.lock:
        return [headers for path, headers in registry.requests if "/blobs/" in path]


def test_plan_splits_only_blobs_of_two_parts_or_more():
    assert parts.plan(1 << 30, 1) is None
    assert parts.plan(127 << 20, 4) is None
    bounds = parts.plan(1 << 30, 4)
    assert len(bounds) == 16 and bounds[0] == (0, 64 << 20) and bounds[-1][1] == 1 << 30
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    uneven = parts.plan(SIZE + 5, 4, PART_MIN)
    assert uneven[-1] == (uneven[-2][1], SIZE + 5)


def test_parts_come_over_several_connections_at_once_and_each_byte_once(setup, registry, big):
    store, client, layer = setup
    registry.gate = threading.Event()
    result = {}
    worker = threading.Thread(target=lambda: result.update(state=fetch_blob(
        client, store, REF, layer, connections=4, part_min=PART_MIN, sleep=no_sleep)))
    worker.start()
    # The registry holds every body half-way, so 4 requests in flight means 4 connections at once.
    wait_for(lambda: len(blob_requests(registry)) == 4, "4 parts requested at once")
    registry.gate.set()
    worker.join(60)
    path = store.blob_path(layer["digest"])
    assert open(path, "rb").read() == big
    assert registry.bytes_served[layer["digest"]] == SIZE == result["state"].received
    ranges = sorted(int(h["Range"].split("=")[1].split("-")[0]) for h in blob_requests(registry))
    assert ranges == [s for s, _ in parts.plan(SIZE, 4, PART_MIN)]
    # The chunk table computed on the way equals one from reading the file.
    assert result["state"].chunk_digests == hash_file(path)[1]
    assert os.listdir(store.blobs_dir) == [os.path.basename(path)]


def test_an_interrupted_download_resumes_every_part_where_it_stopped(setup, registry, big):
    store, client, layer = setup
    registry.gate = threading.Event()
    now = [0.0]
    state = DownloadState(layer["digest"], SIZE)
    failed = {}

    def first():
        try:
            fetch_blob(client, store, REF, layer, connections=4, part_min=PART_MIN, state=state,
                       deadline=1.0, clock=lambda: now[0], sleep=no_sleep)
        except RepairTimeout as e:
            failed["error"] = e

    worker = threading.Thread(target=first)
    worker.start()
    halves = sum((e - s) // 2 for s, e in parts.plan(SIZE, 4, PART_MIN)[:4])
    wait_for(lambda: state.done >= halves, "first halves of 4 parts written")
    now[0] = 2.0
    registry.gate.set()
    worker.join(60)
    assert isinstance(failed.get("error"), RepairTimeout)
    record = json.load(open(parts.record_path(store.partial_path(layer["digest"]))))
    written = sum(done for _s, _e, done in record["parts"])
    assert halves <= written < SIZE
    # Every recorded byte is in the partial file at its place.
    partial = open(store.partial_path(layer["digest"]), "rb").read()
    for start, _end, done in record["parts"]:
        assert partial[start:start + done] == big[start:start + done]

    registry.gate = None
    served_before = registry.bytes_served[layer["digest"]]
    state = fetch_blob(client, store, REF, layer, connections=4, part_min=PART_MIN, sleep=no_sleep)
    assert registry.bytes_served[layer["digest"]] - served_before == SIZE - written == state.received
    assert open(store.blob_path(layer["digest"]), "rb").read() == big
    assert os.listdir(store.blobs_dir) == [os.path.basename(store.blob_path(layer["digest"]))]


def test_a_one_connection_resume_keeps_the_contiguous_prefix_of_a_parallel_download(setup, registry, big):
    store, client, layer = setup
    store.ensure_dirs()
    partial = store.partial_path(layer["digest"])
    bounds = parts.plan(SIZE, 4, PART_MIN)
    # Parts 0 and 1 complete, part 2 half, part 3 a quarter: the prefix ends inside part 2.
    done = [bounds[0][1], bounds[1][1] - bounds[1][0], (bounds[2][1] - bounds[2][0]) // 2,
            (bounds[3][1] - bounds[3][0]) // 4]
    with open(partial, "wb") as f:
        for (s, _e), d in zip(bounds[:4], done, strict=True):
            f.seek(s)
            f.write(big[s:s + d])
    record = [[s, e, d] for (s, e), d in zip(bounds, done + [0] * (len(bounds) - 4), strict=True)]
    with open(parts.record_path(partial), "w") as f:
        json.dump({"size": SIZE, "parts": record}, f)
    prefix = bounds[2][0] + done[2]
    state = fetch_blob(client, store, REF, layer, connections=1, sleep=no_sleep)
    assert state.received == SIZE - prefix == registry.bytes_served[layer["digest"]]
    assert blob_requests(registry)[0]["Range"] == "bytes=%d-" % prefix
    assert open(store.blob_path(layer["digest"]), "rb").read() == big
    assert not os.path.exists(parts.record_path(partial))


def test_a_record_claiming_more_than_the_file_holds_is_cut_to_the_file(setup, registry, big):
    store, client, layer = setup
    store.ensure_dirs()
    partial = store.partial_path(layer["digest"])
    bounds = parts.plan(SIZE, 4, PART_MIN)
    with open(partial, "wb") as f:
        f.write(big[:bounds[0][1] // 2])
    with open(parts.record_path(partial), "w") as f:
        json.dump({"size": SIZE, "parts": [[s, e, e - s] for s, e in bounds]}, f)
    state = fetch_blob(client, store, REF, layer, connections=4, part_min=PART_MIN, sleep=no_sleep)
    assert state.received == SIZE - bounds[0][1] // 2
    assert open(store.blob_path(layer["digest"]), "rb").read() == big


def test_a_registry_that_ignores_ranges_gets_one_connection(setup, registry, big):
    store, client, layer = setup
    registry.ignore_range = True
    fetch_blob(client, store, REF, layer, connections=4, part_min=PART_MIN, sleep=no_sleep)
    assert open(store.blob_path(layer["digest"]), "rb").read() == big
    assert "Range" not in blob_requests(registry)[-1]


@pytest.mark.parametrize("fault", [("reset", 300 << 10), ("alter_body", 1000), ("bad_range",),
                                   ("status", 503), ("short", 10)])
def test_a_fault_in_one_part_ends_in_the_right_blob(setup, registry, big, fault):
    store, client, layer = setup
    registry.faults = [fault]
    state = fetch_blob(client, store, REF, layer, connections=4, part_min=PART_MIN, sleep=no_sleep)
    assert state.attempts == 2
    assert open(store.blob_path(layer["digest"]), "rb").read() == big
    assert os.listdir(store.blobs_dir) == [os.path.basename(store.blob_path(layer["digest"]))]


def test_a_full_disk_under_parts_is_insufficient_storage(setup, mount_tmpfs, big):
    _store, client, layer = setup
    store = Store(mount_tmpfs("4m"))
    with pytest.raises(InsufficientStorage):
        fetch_blob(client, store, REF, layer, connections=4, part_min=PART_MIN, sleep=no_sleep,
                   free_space=lambda _path: 1 << 40)
    assert not os.path.exists(store.blob_path(layer["digest"]))


CHILD = """
import json, sys
sys.path.insert(0, %r)
from repair import names
from repair.download import fetch_blob
from repair.registry import RegistryClient
from repair.store import Store
fetch_blob(RegistryClient(%r), Store(%r), names.parse("gpt-oss:7b"), json.loads(%r),
           connections=4, part_min=%d)
"""


def test_a_killed_download_resumes_from_the_periodic_record(setup, registry, big):
    store, _client, layer = setup
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    registry.gate = threading.Event()
    child = subprocess.Popen([sys.executable, "-c", CHILD % (root, registry.url, store.root,
                                                              json.dumps(layer), PART_MIN)])
    record = parts.record_path(store.partial_path(layer["digest"]))
    halves = sum((e - s) // 2 for s, e in parts.plan(SIZE, 4, PART_MIN)[:4])

    def recorded():
        try:
            return sum(d for _s, _e, d in json.load(open(record))["parts"])
        except (OSError, ValueError):
            return 0

    try:
        # Nothing completes while the registry holds the bodies: only the periodic save records.
        wait_for(lambda: recorded() == halves, "the first halves recorded")
    finally:
        child.kill()
        child.wait()
        registry.gate.set()
    registry.gate = None
    state = fetch_blob(RegistryClient(registry.url), store, REF, layer, connections=4,
                       part_min=PART_MIN, sleep=no_sleep)
    assert state.received == SIZE - halves
    assert open(store.blob_path(layer["digest"]), "rb").read() == big
    assert not os.path.exists(record)
