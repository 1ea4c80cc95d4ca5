"""Chunk tables: the sha256 of each fixed-size chunk of a verified blob, kept beside the store,
so later checks run on all cores and a repair knows which byte ranges to fetch again.

The whole-file digest stays the authority: a table is only ever written from bytes whose
whole-file digest matched, its own sha256 is kept in the verification record, and a blob
patched from it counts as good only after its whole-file digest matches again.
"""

import hashlib
import os
import queue
import threading

from repair import hashing

# 8 MiB: a 64 KiB corruption touches at most 2 chunks, so a range repair moves at most 16 MiB;
# a 10 GB model has ~1200 chunks (a 38 KiB table); and 8 MiB reads keep hashlib (which drops
# the GIL for the whole buffer) busy with little Python overhead per chunk.
CHUNK_SIZE = 8 << 20
DIGEST_LEN = 32


def chunk_count(size, chunk_size=CHUNK_SIZE):
    return max(1, -(-size // chunk_size))


def chunk_range(index, size, chunk_size=CHUNK_SIZE):
    """(offset, length) of chunk `index` of a blob of `size` bytes."""
    start = index * chunk_size
    return start, min(chunk_size, size - start)


class ChunkHasher:
    """Per-chunk sha256 of a byte stream fed in order, computed on a helper thread so it
    overlaps the whole-file hash. The thread starts with the first bytes: a hasher that is
    never fed (or only abandoned) costs none."""

    def __init__(self, chunk_size=CHUNK_SIZE):
        self.chunk_size = chunk_size
        self._queue = queue.Queue(maxsize=16)
        self._digests = []
        self._thread = None

    def update(self, data):
        """Feed the next bytes (copied: the caller may reuse its buffer)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chunk-hasher", daemon=True)
            self._thread.start()
        self._queue.put(bytes(data))

    def _run(self):
        hashing.lower_priority()
        cores = hashing.Cores()
        h, filled = hashlib.sha256(), 0
        while True:
            data = self._queue.get()
            if data is None:
                break
            cores.check()
            view = memoryview(data)
            while view:
                take = min(len(view), self.chunk_size - filled)
                h.update(view[:take])
                filled += take
                view = view[take:]
                if filled == self.chunk_size:
                    self._digests.append(h.digest())
                    h, filled = hashlib.sha256(), 0
        if filled or not self._digests:
            self._digests.append(h.digest())

    def digests(self):
        """Finish and return the raw digests, one per chunk."""
        if self._thread is None:
            return [hashlib.sha256().digest()]
        self._queue.put(None)
        self._thread.join()
        return self._digests

    def abandon(self):
        if self._thread is not None:
            self._queue.put(None)


def hash_file(path, chunk_size=CHUNK_SIZE):
    """(whole-file hex digest, raw chunk digests), in one sequential read on two hashing threads
    (the lowest priority, one core while the engine is busy: repair.hashing)."""

    def both():
        whole = hashlib.sha256()
        chunks = ChunkHasher(chunk_size)
        for block in hashing.read_blocks(path, chunk_size):
            chunks.update(block)
            whole.update(block)
        return whole.hexdigest(), chunks.digests()

    return hashing.run(both)


def bad_chunks(path, table, size, chunk_size=CHUNK_SIZE, workers=None):
    """Indices of the chunks whose sha256 differs from the table, checked on all cores (on
    hashing threads: the lowest priority, one core while the engine is busy)."""
    workers = workers or os.cpu_count() or 1
    local = threading.local()
    fd = os.open(path, os.O_RDONLY)

    def check(index):
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(chunk_size)
            local.cores = hashing.Cores()
        local.cores.check()
        offset, length = chunk_range(index, size, chunk_size)
        view = memoryview(buf)[:length]
        got = os.preadv(fd, [view], offset)
        return index if got != length or hashlib.sha256(view).digest() != table[index] else None

    try:
        with hashing.pool(workers) as pool:
            return [i for i in pool.map(check, range(len(table))) if i is not None]
    finally:
        os.close(fd)


class ChunkTables:
    """Chunk tables as files `<root>/.llmnode/chunks/sha256-<hex>`: raw 32-byte digests."""

    def __init__(self, root):
        self.dir = os.path.join(root, ".llmnode", "chunks")

    def path(self, digest):
        return os.path.join(self.dir, digest.replace(":", "-"))

    def save(self, digest, digests):
        """Write a table; return its own sha256 for the verification record."""
        from repair.store import write_atomically

        os.makedirs(self.dir, exist_ok=True)
        raw = b"".join(digests)
        write_atomically(self.path(digest), raw)
        return hashlib.sha256(raw).hexdigest()

    def load(self, digest, size, expected_sha, chunk_size=CHUNK_SIZE):
        """The table if it is the one recorded and fits the blob's size; None otherwise."""
        try:
            with open(self.path(digest), "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if not expected_sha or hashlib.sha256(raw).hexdigest() != expected_sha:
            return None
        if len(raw) != DIGEST_LEN * chunk_count(size, chunk_size):
            return None
        return [raw[i:i + DIGEST_LEN] for i in range(0, len(raw), DIGEST_LEN)]

    def remove(self, digest):
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass
