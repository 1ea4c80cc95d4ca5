"""The store's records, kept in the store: which blobs were verified and how they looked then,
their chunk tables' digests, the manifest pins, and the blobs pulls are installing."""

import json
import logging
import os
import threading
import time
from contextlib import contextmanager

from repair.locks import FileLock
from repair.store import pid_alive, stat_stamp, write_atomically

RECORDS_DIR = ".llmnode"

log = logging.getLogger("llmnode.records")


def _empty():
    return {"blobs": {}, "manifests": {}, "tables": {}, "pulls": {}}


class StoreRecords:
    """The store's one records file: blob digest -> (size, mtime_ns, inode) at its last full
    check; blob digest -> sha256 of its chunk table; model -> manifest sha256 (its pin);
    pull -> (pid, the digests it is installing), so a delete never takes a blob a pull's
    manifest will name.

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

    def snapshot(self):
        """The records as on disk now (re-read only when the file's stat changed)."""
        stamp = stat_stamp(self.path)
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
                data.setdefault("pulls", {})
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

    @contextmanager
    def changing(self):
        """The records as on disk, under the cross-process lock, to change in place; written
        when the block ends without an error (unless it sets `data["unchanged"]`). The store
        operations (delete, copy, a pull's last step) run inside it, so each is one step to
        every other writer. Not reentrant: inside it, change `data`, not these methods."""
        with self._write_lock, FileLock(self._file_lock_path):
            data = json.loads(json.dumps(self.snapshot()))
            yield data
            if data.pop("unchanged", False):
                return
            write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
            self._cache = (stat_stamp(self.path), data)

    def _update(self, change):
        """Apply `change(data)` to the records as on disk, under the cross-process lock."""
        with self.changing() as data:
            if change(data) is False:
                data["unchanged"] = True

    def _get(self, section, key):
        return self.snapshot()[section].get(key)

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

    def begin_pull(self, digests):
        """Mark `digests` as being installed by this process's pull; the pull's key."""
        key = "%d-%s" % (os.getpid(), os.urandom(6).hex())
        self._update(lambda data: data["pulls"].__setitem__(key, {"pid": os.getpid(),
                                                                 "digests": sorted(digests)}))
        return key

    def end_pull(self, key):
        self._update(lambda data: data["pulls"].pop(key, None) is not None)


def claimed_by_pulls(data):
    """Digests that pulls of live processes are installing (a killed pull's claim ends with it)."""
    return {d for pull in data["pulls"].values() if pid_alive(pull["pid"]) for d in pull["digests"]}
