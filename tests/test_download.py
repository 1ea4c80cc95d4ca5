import hashlib
import os

import pytest
import requests
import responses

from repair import names
from repair.download import fetch_blob
from repair.errors import BadRange, DigestMismatch, InsufficientStorage, RegistryHTTPError
from repair.registry import RegistryClient
from repair.retry import Retry
from repair.store import Store, model_layer
from tests.conftest import no_sleep
from tests.fakeregistry import digest_of

REF = names.parse("gpt-oss:7b")


@pytest.fixture
def setup(registry, tmp_path):
    store = Store(str(tmp_path / "models"))
    client = RegistryClient(registry.url)
    layer = model_layer(__import__("json").loads(registry.manifests[("library/gpt-oss", "7b")]))
    return store, client, layer, registry.blobs[layer["digest"]]


def leave_partial(store, layer, data):
    """A partial file holding `data`, as an interrupted download leaves it."""
    store.ensure_dirs()
    with open(store.partial_path(layer["digest"]), "wb") as f:
        f.write(data)


def test_blob_is_installed_under_its_digest_and_verified(setup, registry):
    store, client, layer, data = setup
    state = fetch_blob(client, store, REF, layer, sleep=no_sleep)
    path = store.blob_path(layer["digest"])
    assert open(path, "rb").read() == data
    assert state.received == len(data) == registry.bytes_served[layer["digest"]]
    assert not os.path.exists(store.partial_path(layer["digest"]))


def test_a_partial_prefix_is_resumed_and_only_the_rest_fetched(setup, registry):
    store, client, layer, data = setup
    half = len(data) // 2 + 123
    leave_partial(store, layer, data[:half])
    state = fetch_blob(client, store, REF, layer, sleep=no_sleep)
    assert registry.bytes_served[layer["digest"]] == len(data) - half == state.received
    assert registry.requests[-1][1].get("Range") == "bytes=%d-" % half
    assert open(store.blob_path(layer["digest"]), "rb").read() == data


def test_a_200_to_a_range_request_restarts_from_zero(setup, registry):
    store, client, layer, data = setup
    leave_partial(store, layer, data[:1000])
    registry.ignore_range = True
    fetch_blob(client, store, REF, layer, sleep=no_sleep)
    assert registry.bytes_served[layer["digest"]] == len(data)
    assert open(store.blob_path(layer["digest"]), "rb").read() == data


def test_a_wrong_content_range_start_is_an_error_and_the_partial_is_dropped(setup, registry):
    store, client, layer, data = setup
    leave_partial(store, layer, data[:1000])
    registry.content_range_offset = 10
    with pytest.raises(BadRange):
        fetch_blob(client, store, REF, layer, sleep=no_sleep, retry=Retry(total=1))
    assert not os.path.exists(store.blob_path(layer["digest"]))
    assert not os.path.exists(store.partial_path(layer["digest"]))
    fetch_blob(client, store, REF, layer, sleep=no_sleep)
    assert "Range" not in registry.requests[-1][1]
    assert open(store.blob_path(layer["digest"]), "rb").read() == data


def test_wrong_bytes_are_never_installed_under_the_digest(setup, registry):
    store, client, layer, data = setup
    registry.tamper = lambda d: d[:5000] + bytes(b ^ 0xFF for b in d[5000:5064]) + d[5064:]
    with pytest.raises(DigestMismatch) as err:
        fetch_blob(client, store, REF, layer, sleep=no_sleep)
    assert err.value.expected == layer["digest"]
    assert err.value.actual == hashlib.sha256(registry.tamper(data)).hexdigest()
    assert not os.path.exists(store.blob_path(layer["digest"]))
    assert not os.path.exists(store.partial_path(layer["digest"]))


def test_a_bad_resumed_prefix_is_fetched_again_from_zero(setup, registry):
    store, client, layer, data = setup
    leave_partial(store, layer, b"\0" * 4096)
    fetch_blob(client, store, REF, layer, sleep=no_sleep)
    assert open(store.blob_path(layer["digest"]), "rb").read() == data
    assert registry.bytes_served[layer["digest"]] == len(data) - 4096 + len(data)


def test_free_space_is_checked_before_any_request(setup, registry):
    store, client, layer, _ = setup
    with pytest.raises(InsufficientStorage):
        fetch_blob(client, store, REF, layer, free_space=lambda path: 1000)
    assert registry.requests == []


@pytest.fixture
def small_tmpfs(mount_tmpfs):
    return mount_tmpfs("256k")


def test_a_real_full_disk_is_found_before_download(setup, registry, small_tmpfs):
    _, client, layer, _ = setup
    store = Store(small_tmpfs)
    with pytest.raises(InsufficientStorage):
        fetch_blob(client, store, REF, layer)
    assert registry.bytes_served[layer["digest"]] == 0


def test_a_disk_that_fills_during_download_is_storage_full(setup, registry, small_tmpfs):
    _, client, layer, _ = setup
    store = Store(small_tmpfs)
    with pytest.raises(InsufficientStorage):
        fetch_blob(client, store, REF, layer, free_space=lambda path: 1 << 40)
    assert not os.path.exists(store.blob_path(layer["digest"]))


BLOB = b"x" * 3000
LAYER = {"digest": digest_of(BLOB), "size": len(BLOB)}
BLOB_URL = "https://reg.example/v2/library/gpt-oss/blobs/" + LAYER["digest"]


@responses.activate
def test_5xx_bursts_and_connection_errors_are_retried(tmp_path):
    responses.add(responses.GET, BLOB_URL, status=503)
    responses.add(responses.GET, BLOB_URL, body=requests.ConnectionError("reset"))
    responses.add(responses.GET, BLOB_URL, status=502)
    responses.add(responses.GET, BLOB_URL, body=BLOB, status=200)
    store = Store(str(tmp_path))
    sleeps = []
    state = fetch_blob(RegistryClient("https://reg.example"), store, REF, LAYER,
                       sleep=sleeps.append, retry=Retry(total=5, backoff_factor=0.5))
    assert state.attempts == 4
    assert len(sleeps) == 3
    assert open(store.blob_path(LAYER["digest"]), "rb").read() == BLOB


@responses.activate
def test_429_retry_after_is_honoured(tmp_path):
    responses.add(responses.GET, BLOB_URL, status=429, headers={"Retry-After": "4"})
    responses.add(responses.GET, BLOB_URL, body=BLOB, status=200)
    sleeps = []
    fetch_blob(RegistryClient("https://reg.example"), Store(str(tmp_path)), REF, LAYER,
               sleep=sleeps.append)
    assert sleeps == [4.0]


@responses.activate
def test_retries_run_out_with_the_last_error(tmp_path):
    for _ in range(3):
        responses.add(responses.GET, BLOB_URL, status=500)
    with pytest.raises(RegistryHTTPError) as err:
        fetch_blob(RegistryClient("https://reg.example"), Store(str(tmp_path)), REF, LAYER,
                   sleep=no_sleep, retry=Retry(total=3))
    assert err.value.status_code == 500
    assert err.value.message == "Model repair failed: registry error"
    assert len(responses.calls) == 3
