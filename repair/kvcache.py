"""The prompt cache on disk: KV states of long prompt prefixes under `.llmnode/kv/`, written as
blobs are and checked against their sha256 before anyone reads them.

An entry is two files in the directory of its key (what makes a state valid: the weights'
digest, the llama.cpp build, the context and KV settings): `<name>.kv`, the state's bytes as
llama.cpp gave them, and `<name>.json`, the key, the prompt's tokens, the bytes' size and
sha256. Both are written under an flock on `kv.lock` (temporary file, fsync, rename; the data
before the record naming it), so several nodes on one store never tear an entry. It is derived
data: a bad entry is deleted and its prefix computed again. The engine hands this module bytes
and a key; this module alone writes them.
"""

import array
import hashlib
import json
import logging
import os
import queue
import threading
import time
from contextlib import contextmanager

from repair.hashing import sha256_file
from repair.locks import FileLock
from repair.store import stat_stamp, write_atomically

log = logging.getLogger("llmnode.kvcache")

KV_DIR = os.path.join(".llmnode", "kv")
# How long a writer waits for another node's save of an entry: a save is one file's write.
LOCK_WAIT_SECS = 60


def key_id(key):
    """The directory name of a key (a dict of what makes a state valid)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def tokens_id(tokens):
    return hashlib.sha256(array.array("i", tokens).tobytes()).hexdigest()[:32]


def common_prefix(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """The saved prompt prefixes of one store, at most `max_bytes` of them (the least recently
    used leave first)."""

    def __init__(self, root, max_bytes, clock=time.time):
        self.dir = os.path.join(root, KV_DIR)
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock_path = os.path.join(self.dir, "kv.lock")
        # Guards _parsed: record path -> (its stat stamp, the record read from it). A request's
        # look-up reads every record of its key (each holds its tokens): each is parsed again
        # only when its file has changed.
        self._parsed_lock = threading.Lock()
        self._parsed = {}

    def _paths(self, key, tokens):
        base = os.path.join(self.dir, key_id(key), tokens_id(tokens))
        return base + ".kv", base + ".json"

    # -- reading --

    def find(self, key, tokens, min_tokens):
        """(saved tokens, state bytes) of the entry of `key` sharing the longest prefix of at
        least `min_tokens` with `tokens`, its bytes checked against their sha256; None if there
        is none. A bad entry met on the way is deleted (and logged), and the next one tried."""
        d = os.path.join(self.dir, key_id(key))
        candidates = []
        for record in self._records(d):
            if record.get("key") != key:
                continue  # another key's entry where this key's belong: never restored
            shared = common_prefix(record["tokens"], tokens)
            if shared >= min_tokens:
                candidates.append((shared, record))
        for _shared, record in sorted(candidates, key=lambda c: -c[0]):
            data = self._read_checked(record)
            if data is not None:
                return record["tokens"], data
        return None

    def _records(self, d):
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            path = os.path.join(d, name)
            stamp = stat_stamp(path)
            with self._parsed_lock:
                kept = self._parsed.get(path)
            if stamp is not None and kept is not None and kept[0] == stamp:
                records.append(kept[1])
                continue
            try:
                with open(path, "rb") as f:
                    record = json.loads(f.read())
                record["path"] = path[:-len(".json")] + ".kv"
                if not isinstance(record.get("tokens"), list) or not isinstance(record.get("sha256"), str):
                    raise ValueError("not a prompt-cache record")
            except FileNotFoundError:
                continue
            except (ValueError, UnicodeDecodeError) as e:
                self._drop(path[:-len(".json")] + ".kv", "its record is unreadable (%s)" % e)
                continue
            with self._parsed_lock:
                if stamp is not None:
                    self._parsed[path] = (stamp, record)
                for gone in [p for p in self._parsed if os.path.dirname(p) == d and
                             os.path.basename(p) not in names]:
                    del self._parsed[gone]
            records.append(record)
        return records

    def _read_checked(self, record, locked=False):
        """The entry's bytes if they are the ones recorded; else the entry is deleted."""
        path = record["path"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        problem = None
        if len(data) != record.get("size"):
            problem = "it holds %d bytes, its record says %s" % (len(data), record.get("size"))
        elif hashlib.sha256(data).hexdigest() != record["sha256"]:
            problem = "its bytes do not match their sha256"
        if problem is None:
            try:
                os.utime(path)  # used: the last to leave
            except OSError:
                pass
            return data
        if locked:
            self._drop(path, problem)
            return None
        # A writer may have replaced the pair between our two reads: look again under its lock.
        with self._locked():
            again = [r for r in self._records(os.path.dirname(path)) if r["path"] == path]
            if again and again[0]["sha256"] != record["sha256"]:
                return self._read_checked(again[0], locked=True)
            self._drop(path, problem)
        return None

    @contextmanager
    def _locked(self):
        """The store's prompt-cache lock (every writer and deleter of entries, in any process)."""
        lock = FileLock(self._lock_path)
        lock.acquire(deadline=time.monotonic() + LOCK_WAIT_SECS)
        try:
            yield
        finally:
            lock.release()

    def _drop(self, path, why):
        """Delete an entry (data and record), logging the file and why."""
        log.warning("prompt cache entry %s deleted: %s; its prefix is computed again", path, why)
        for p in (path, path[:-len(".kv")] + ".json"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # -- writing --

    def save(self, key, tokens, data):
        """Save a state: its bytes, then the record naming them and their sha256, then the
        least recently used entries past `max_bytes` leave. An OSError (a full disk) leaves no
        file of this entry behind and is raised."""
        if len(data) > self.max_bytes:
            return False
        path, record_path = self._paths(key, tokens)
        record = {"key": key, "tokens": list(tokens), "size": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "saved": self.clock()}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with self._locked():
            try:
                write_atomically(path, data)
                write_atomically(record_path, json.dumps(record).encode())
            except OSError:
                for p in (path, record_path):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
                raise
            self._evict()
        return True

    def _evict(self):
        """Delete the least recently used entries until the rest fit `max_bytes` (lock held)."""
        entries = []
        for path, size, used in self._files():
            entries.append((used, size, path))
        total = sum(size for _used, size, _path in entries)
        for _used, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            log.info("prompt cache entry %s deleted: the cache holds more than %d bytes "
                     "(LLM_PROMPT_CACHE_BYTES)", path, self.max_bytes)
            for p in (path, path[:-len(".kv")] + ".json"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            total -= size

    def _files(self):
        """(path, size, last use) of every entry's data file."""
        found = []
        if not os.path.isdir(self.dir):
            return found
        for d, _dirs, files in os.walk(self.dir):
            for name in files:
                if name.endswith(".kv"):
                    try:
                        st = os.stat(os.path.join(d, name))
                    except FileNotFoundError:
                        continue
                    found.append((os.path.join(d, name), st.st_size, st.st_mtime))
        return found

    # -- the commands' side --

    def entries(self):
        """(data path, size) of every entry: what `list` reports."""
        return [(path, size) for path, size, _used in self._files()]

    def verify(self, drop=True):
        """Check every entry against its record: (good, bad) counts. With `drop`, a bad entry
        (or a data file no record names) is deleted."""
        good = bad = 0
        if not os.path.isdir(self.dir):
            return good, bad
        for d in sorted(os.listdir(self.dir)):
            d = os.path.join(self.dir, d)
            if not os.path.isdir(d):
                continue
            recorded = set()
            for record in self._records(d):
                recorded.add(record["path"])
                if not drop:
                    ok = self._intact(record)
                else:
                    ok = self._read_checked(record) is not None
                good, bad = good + ok, bad + (not ok)
            for name in os.listdir(d):
                path = os.path.join(d, name)
                if name.endswith(".kv") and path not in recorded:
                    bad += 1
                    if drop:
                        self._drop(path, "no record names it")
        return good, bad

    def _intact(self, record):
        """Whether an entry's file has its recorded size and sha256 (hashed as verify hashes
        blobs: on a hashing thread that yields to a running engine)."""
        try:
            size = os.path.getsize(record["path"])
            return size == record.get("size") and sha256_file(record["path"]) == record["sha256"]
        except FileNotFoundError:
            return False


class Saver:
    """Saves states on a thread of its own, so a long write never holds the engine; at most
    `depth` states wait (the others are not saved: they are a cache)."""

    def __init__(self, cache, depth=4):
        self.cache = cache
        self._queue = queue.Queue(depth)
        # Guards _pending (states handed over and not yet written or given up); notified when
        # it drops.
        self._cond = threading.Condition()
        self._pending = 0
        threading.Thread(target=self._run, name="prompt-cache-saver", daemon=True).start()

    def put(self, key, tokens, data):
        with self._cond:
            self._pending += 1
        try:
            self._queue.put_nowait((key, tokens, data))
        except queue.Full:
            self._done()

    def _run(self):
        while True:
            key, tokens, data = self._queue.get()
            try:
                self.cache.save(key, tokens, data)
            except Exception as e:  # a full disk, a lock held past its deadline: not saved
                log.warning("prompt cache: a prefix of %d tokens was not saved: %s", len(tokens), e)
            finally:
                self._done()

    def _done(self):
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def flush(self, timeout):
        """Wait until every state handed over is written (or given up); False past `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
