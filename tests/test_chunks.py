import hashlib
import os

import pytest

from repair.chunks import ChunkHasher, ChunkTables, bad_chunks, chunk_count, chunk_range, hash_file
from repair.errors import ModelCorrupted
from repair.guard import IntegrityGuard
from repair.store import Store
from tests.fakeregistry import digest_of

CS = 64 << 10  # small chunks keep these tests fast; the code takes the size as a parameter


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(10 * CS + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return str(path), data


def test_hash_file_gives_the_whole_digest_and_one_digest_per_chunk(blob):
    path, data = blob
    whole, chunks = hash_file(path, chunk_size=CS)
    assert whole == hashlib.sha256(data).hexdigest()
    assert len(chunks) == chunk_count(len(data), CS) == 11
    for i, d in enumerate(chunks):
        start, length = chunk_range(i, len(data), CS)
        assert d == hashlib.sha256(data[start:start + length]).digest()


def test_a_stream_fed_in_odd_pieces_gives_the_same_table(blob):
    path, data = blob
    hasher = ChunkHasher(CS)
    for i in range(0, len(data), 7777):
        hasher.update(data[i:i + 7777])
    assert hasher.digests() == hash_file(path, chunk_size=CS)[1]


def test_bad_chunks_names_exactly_the_damaged_ones(blob):
    path, data = blob
    table = hash_file(path, chunk_size=CS)[1]
    assert bad_chunks(path, table, len(data), CS) == []
    with open(path, "r+b") as f:
        f.seek(3 * CS - 10)  # straddles chunks 2 and 3
        f.write(b"\0" * 20)
        f.seek(len(data) - 1)
        f.write(b"\1")
    assert bad_chunks(path, table, len(data), CS) == [2, 3, 10]


def test_a_table_that_changed_on_disk_is_not_trusted(tmp_path):
    tables = ChunkTables(str(tmp_path))
    digests = [hashlib.sha256(b"x").digest()] * 3
    sha = tables.save("sha256:" + "a" * 64, digests)
    assert tables.load("sha256:" + "a" * 64, 3 * (8 << 20), sha) == digests
    with open(tables.path("sha256:" + "a" * 64), "r+b") as f:
        f.write(b"\0")
    assert tables.load("sha256:" + "a" * 64, 3 * (8 << 20), sha) is None
    assert tables.load("sha256:" + "b" * 64, 3 * (8 << 20), sha) is None


def test_the_guard_writes_a_table_then_checks_by_it(tmp_path):
    store = Store(str(tmp_path))
    store.ensure_dirs()
    data = b"GGUF" + os.urandom(20 << 20)
    layer = {"digest": digest_of(data), "size": len(data)}
    path = store.blob_path(layer["digest"])
    with open(path, "wb") as f:
        f.write(data)
    guard = IntegrityGuard(store)
    assert guard.table(layer) is None
    guard.verify(layer, gguf=True)
    assert len(guard.table(layer)) == 3
    with open(path, "r+b") as f:
        f.seek(9 << 20)
        f.write(b"\xff" * 64)
    with pytest.raises(ModelCorrupted) as err:
        IntegrityGuard(store).verify(layer, gguf=True)
    assert err.value.bad_chunks == [1]
