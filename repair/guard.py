"""The integrity guard: a stat compared with the last verification, else a full check."""

import os
import time

from repair.metrics import Metrics
from repair.records import VerifiedRecords
from repair.verify import BlobCorrupted, check_blob


class IntegrityGuard:
    """Decides whether a blob can be used as is, and records each successful full check."""

    def __init__(self, store, records=None, metrics=None, clock=time.monotonic):
        self.store = store
        self.records = records or VerifiedRecords(store.root)
        self.metrics = metrics or Metrics()
        self.clock = clock

    def unchanged(self, layer):
        """Cheap: the blob exists and its size, mtime and inode are as last verified."""
        try:
            st = os.stat(self.store.blob_path(layer["digest"]))
        except FileNotFoundError:
            return False
        return st.st_size == layer["size"] and self.records.blob_unchanged(layer["digest"], st)

    def verify(self, layer, gguf=False):
        """Full check: size, GGUF header, sha256. Raise BlobCorrupted or record the blob."""
        path = self.store.blob_path(layer["digest"])
        started = self.clock()
        try:
            st = check_blob(path, layer["digest"], layer["size"], gguf=gguf)
        except BlobCorrupted as e:
            if e.reason != "missing":
                self.metrics.inc("llmnode_corrupted_blobs_found_total")
            self.records.forget_blob(layer["digest"])
            raise
        finally:
            self.metrics.inc("llmnode_verify_seconds_total", self.clock() - started)
        self.records.record_blob(layer["digest"], st)

    def record_installed(self, layer):
        """A blob just installed by a download whose hash was taken as it was written."""
        self.records.record_blob(layer["digest"], os.stat(self.store.blob_path(layer["digest"])))
