"""The integrity guard: a stat compared with the last verification, else a full check.

A blob whose size, mtime and inode are as recorded at its last verification is used as is (the
weights in memory were verified when they were read); any other is checked in full before use:
size against the manifest, GGUF header, and sha256 (each 8 MiB chunk against the chunk table on
all cores when there is one, else the whole file). EIO counts as corrupted. Each success is
recorded in `.llmnode/verified.json`; blobs installed by a pull or a repair are recorded from the
hash taken while they were written. Every load from disk is verified beside it by the node, so
bit rot that leaves size and times untouched is caught there, not here."""

import os
import time

from repair.chunks import ChunkTables, bad_chunks, hash_file
from repair.errors import ModelCorrupted
from repair.metrics import Metrics
from repair.records import StoreRecords
from repair.verify import check_digest, check_present


class IntegrityGuard:
    """Decides whether a blob can be used as is, and records each successful full check."""

    def __init__(self, store, metrics=None):
        self.store = store
        self.records = StoreRecords(store.root)
        self.tables = ChunkTables(store.root)
        self.metrics = metrics or Metrics()

    def unchanged(self, layer):
        """Cheap: the blob exists and its size, mtime and inode are as last verified."""
        try:
            st = os.stat(self.store.blob_path(layer["digest"]))
        except FileNotFoundError:
            return False
        return st.st_size == layer["size"] and self.records.blob_unchanged(layer["digest"], st)

    def verify(self, layer, gguf=False):
        """Full check: size, GGUF header, then the chunk table on all cores if the blob has one,
        else the whole-file sha256 (which writes the table). Raise ModelCorrupted or record."""
        digest, size = layer["digest"], layer["size"]
        path = self.store.blob_path(digest)
        started = time.monotonic()
        try:
            st = check_present(path, size, gguf=gguf)
            table = self.tables.load(digest, size, self.records.table_sha(digest))
            if table:
                bad = bad_chunks(path, table, size)
                if bad:
                    raise ModelCorrupted(path, "sha256 mismatch in %d of %d chunks (chunk table)"
                                        % (len(bad), len(table)), bad_chunks=bad)
            else:
                whole, chunk_digests = hash_file(path)
                check_digest(path, digest, whole)
                self.records.record_table(digest, self.tables.save(digest, chunk_digests))
        except OSError as e:
            # A disk that cannot read the blob (EIO) holds no usable copy of it.
            self.metrics.inc("llmnode_corrupted_blobs_found_total")
            self.records.forget_blob(layer["digest"])
            raise ModelCorrupted(path, "unreadable: %s" % e) from e
        except ModelCorrupted as e:
            if e.reason != "missing":
                self.metrics.inc("llmnode_corrupted_blobs_found_total")
            self.records.forget_blob(layer["digest"])
            raise
        finally:
            self.metrics.inc("llmnode_verify_seconds_total", time.monotonic() - started)
        self.records.record_blob(digest, st)

    def table(self, layer):
        """The blob's chunk table, if it has a trustworthy one."""
        return self.tables.load(layer["digest"], layer["size"], self.records.table_sha(layer["digest"]))

    def record_installed(self, layer, chunk_digests=None):
        """A blob just installed from bytes whose hash was taken as they were written."""
        if chunk_digests:
            self.records.record_table(layer["digest"], self.tables.save(layer["digest"], chunk_digests))
        self.records.record_blob(layer["digest"], os.stat(self.store.blob_path(layer["digest"])))
