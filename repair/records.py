"""Verification records: which blobs were verified and how they looked then, kept in the store."""

import json
import os
import threading
import time

from repair.store import write_atomically

RECORDS_DIR = ".llmnode"


class VerifiedRecords:
    """Blob digest -> (size, mtime_ns, inode) at its last full check; blob digest -> sha256 of
    its chunk table; model -> manifest sha256."""

    def __init__(self, root):
        self.path = os.path.join(root, RECORDS_DIR, "verified.json")
        # Guards `_data` and writes of the records file.
        self._lock = threading.Lock()
        self._data = self._load()

    def _load(self):
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
            if isinstance(data.get("blobs"), dict) and isinstance(data.get("manifests"), dict):
                data.setdefault("tables", {})
                return data
        except (OSError, ValueError, AttributeError):
            pass
        return {"blobs": {}, "manifests": {}, "tables": {}}

    def _save(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_atomically(self.path, json.dumps(self._data, indent=1, sort_keys=True).encode())

    def blob_unchanged(self, digest, st):
        """Whether a stat result matches the blob as it was when last verified."""
        with self._lock:
            rec = self._data["blobs"].get(digest)
        return bool(rec) and (rec["size"], rec["mtime_ns"], rec["ino"]) == (
            st.st_size, st.st_mtime_ns, st.st_ino)

    def record_blob(self, digest, st):
        with self._lock:
            self._data["blobs"][digest] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                           "ino": st.st_ino, "verified_at": int(time.time())}
            self._save()

    def forget_blob(self, digest):
        with self._lock:
            if self._data["blobs"].pop(digest, None) is not None:
                self._save()

    def table_sha(self, digest):
        with self._lock:
            return self._data["tables"].get(digest)

    def record_table(self, digest, table_sha):
        with self._lock:
            self._data["tables"][digest] = table_sha
            self._save()

    def manifest_digest(self, ref):
        with self._lock:
            return self._data["manifests"].get(str(ref))

    def record_manifest(self, ref, hexdigest):
        with self._lock:
            if self._data["manifests"].get(str(ref)) != hexdigest:
                self._data["manifests"][str(ref)] = hexdigest
                self._save()
