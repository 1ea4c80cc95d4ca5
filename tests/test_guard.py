"""The integrity guard: a verified blob trusted by its stat until it changes, the full check
naming what is wrong, a flip only the digest catches, and an unreadable blob taken as corrupted."""

import os

import pytest

import llmnode
from repair.errors import ModelCorrupted
from repair.guard import IntegrityGuard
from repair.store import Store
from tests.conftest import blob_of
from tests.fakeregistry import digest_of


@pytest.fixture
def blob(tmp_path):
    store = Store(str(tmp_path))
    store.ensure_dirs()
    data = b"GGUF" + os.urandom(5000)
    layer = {"digest": digest_of(data), "size": len(data)}
    with open(store.blob_path(layer["digest"]), "wb") as f:
        f.write(data)
    return store, layer


def test_a_verified_blob_is_trusted_by_stat_even_after_a_restart(blob):
    store, layer = blob
    assert not IntegrityGuard(store).unchanged(layer)
    IntegrityGuard(store).verify(layer, gguf=True)
    assert IntegrityGuard(store).unchanged(layer)


def test_a_changed_blob_is_no_longer_trusted(blob):
    store, layer = blob
    guard = IntegrityGuard(store)
    guard.verify(layer)
    with open(store.blob_path(layer["digest"]), "r+b") as f:
        f.seek(2000)
        f.write(b"\0" * 64)
    assert not guard.unchanged(layer)
    with pytest.raises(ModelCorrupted, match="sha256 mismatch"):
        guard.verify(layer)
    assert not IntegrityGuard(store).unchanged(layer)


@pytest.mark.parametrize("damage, reason", [
    (lambda p: os.unlink(p), "missing"),
    (lambda p: os.truncate(p, 100), "size 100"),
    (lambda p: open(p, "r+b").write(b"XXXX"), "bad header"),
])
def test_the_full_check_names_what_is_wrong(blob, damage, reason):
    store, layer = blob
    damage(store.blob_path(layer["digest"]))
    with pytest.raises(ModelCorrupted, match=reason):
        IntegrityGuard(store).verify(layer, gguf=True)


def test_a_flip_that_keeps_size_and_times_is_caught_only_by_the_digest(blob):
    store, layer = blob
    guard = IntegrityGuard(store)
    guard.verify(layer)
    path = store.blob_path(layer["digest"])
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(3000)
        f.write(b"\xff" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert guard.unchanged(layer)
    with pytest.raises(ModelCorrupted, match="sha256 mismatch"):
        guard.verify(layer)


def test_an_unreadable_blob_counts_as_corrupted(pulled, registry):
    from tests.conftest import settings_for
    node = llmnode.Node(settings_for(pulled, registry.url))
    layer, blob = blob_of(pulled)
    # A directory where the blob should be: opening it for reading fails like a bad disk does.
    os.unlink(blob)
    os.mkdir(blob)
    with pytest.raises(ModelCorrupted) as raised:
        node.guard.verify(dict(layer, size=os.stat(blob).st_size), gguf=True)
    assert raised.value.reason.startswith("unreadable: ")
    os.rmdir(blob)
