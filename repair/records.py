"""Verification records: which blobs were verified and how they looked then, kept in the store."""

import json
import logging
import os
import threading
import time

from repair.locks import FileLock
from repair.store import write_atomically

RECORDS_DIR = ".llmnode"

log = logging.getLogger("llmnode.records")


def _empty():
    return {"blobs": {}, "manifests": {}, "tables": {}}


class VerifiedRecords:
    """Blob digest -> (size, mtime_ns, inode) at its last full check; blob digest -> sha256 of
    its chunk table; model -> manifest sha256 (its pin).

    Every process on a store shares one file: each change is made under an flock on
    `verified.lock`, to the file as it is on disk then, and written atomically, so no
    writer's entry is lost to another's stale copy. Reads use the file as last seen,
    reloaded when its stat changes."""

    def __init__(self, root):
        self.path = os.path.join(root, RECORDS_DIR, "verified.json")
        self._file_lock_path = os.path.join(root, RECORDS_DIR, "verified.lock")
        # Serialises this process's writers (the flock serialises processes). Readers never
        # take it, so a request never waits behind a writer's fsync.
        self._write_lock = threading.Lock()
        # (file stat stamp, records) as last read or written; replaced whole, never mutated.
        self._cache = (None, _empty())

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _snapshot(self):
        """The records as on disk now (re-read only when the file's stat changed)."""
        stamp = self._stat()
        cached_stamp, data = self._cache
        if stamp is not None and stamp == cached_stamp:
            return data
        data = self._read()
        self._cache = (stamp, data)
        return data

    def _read(self):
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return _empty()
        try:
            data = json.loads(raw)
            if isinstance(data.get("blobs"), dict) and isinstance(data.get("manifests"), dict):
                data.setdefault("tables", {})
                return data
            problem = "not a records object"
        except (ValueError, AttributeError) as e:
            problem = str(e)
        # Never reset silently: every pin is in this file. Keep it for the operator.
        aside = "%s.unreadable-%d" % (self.path, time.time_ns())
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return self._read()  # another reader moved it aside first
        log.error("verification records %s unreadable (%s); moved to %s and starting empty: "
                  "blobs are verified again on use, and manifests are pinned again from the "
                  "store", self.path, problem, aside)
        return _empty()

    def _update(self, change):
        """Apply `change(data)` to the records as on disk, under the cross-process lock."""
        with self._write_lock, FileLock(self._file_lock_path):
            data = json.loads(json.dumps(self._snapshot()))
            if change(data) is False:
                return
            write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
            self._cache = (self._stat(), data)

    def _get(self, section, key):
        return self._snapshot()[section].get(key)

    def blob_unchanged(self, digest, st):
        """Whether a stat result matches the blob as it was when last verified."""
        rec = self._get("blobs", digest)
        return bool(rec) and (rec["size"], rec["mtime_ns"], rec["ino"]) == (
            st.st_size, st.st_mtime_ns, st.st_ino)

    def record_blob(self, digest, st):
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                 "verified_at": int(time.time())}
        self._update(lambda data: data["blobs"].__setitem__(digest, entry))

    def forget_blob(self, digest):
        self._update(lambda data: data["blobs"].pop(digest, None) is not None)

    def table_sha(self, digest):
        return self._get("tables", digest)

    def record_table(self, digest, table_sha):
        self._update(lambda data: data["tables"].__setitem__(digest, table_sha))

    def manifest_digest(self, ref):
        return self._get("manifests", str(ref))

    def record_manifest(self, ref, hexdigest):
        def change(data):
            if data["manifests"].get(str(ref)) == hexdigest:
                return False
            data["manifests"][str(ref)] = hexdigest
        self._update(change)

    def forget_manifest(self, ref):
        self._update(lambda data: data["manifests"].pop(str(ref), None) is not None)
