"""Parallel ranged download: a large blob fetched as parts over several connections (as Ollama
does), each part written in place in the partial file.

The whole-file digest and the chunk table are computed in order, on their own threads, from the
contiguous prefix the parts have written so far, so the blob is never read a second time. A
progress record beside the partial file (`<partial>.parts`, JSON) says how much of each part is
written, so an interrupted download resumes every part where it stopped.
"""

import errno
import hashlib
import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass

import requests

from repair.chunks import ChunkHasher
from repair.errors import (
    DigestMismatch,
    DownloadError,
    InsufficientStorage,
    NetworkError,
    RegistryHTTPError,
    RepairTimeout,
)
from repair.registry import check_content_range
from repair.store import write_atomically

log = logging.getLogger("llmnode.download")

# A blob is split only if it makes at least two parts of PART_MIN: below that, the extra
# requests buy nothing. Each connection gets about PARTS_PER_CONNECTION parts, so connections
# work near each other and the in-order hash trails the download closely.
PART_MIN = 64 << 20
PART_MAX = 1 << 30
PARTS_PER_CONNECTION = 4
MAX_CONNECTIONS = 16
# Seconds between progress records while parts are being written (and at each part's end).
SAVE_EVERY = 1.0
HASH_BLOCK = 1 << 20


class RangesUnsupported(Exception):
    """The registry answered a part's Range request with the whole blob."""


@dataclass
class Part:
    start: int
    end: int  # exclusive
    done: int = 0

    @property
    def length(self):
        return self.end - self.start

    @property
    def complete(self):
        return self.done >= self.length


def plan(size, connections, part_min=PART_MIN):
    """Part boundaries [(start, end)] for a blob, or None if it goes over one connection."""
    if connections < 2 or size < 2 * part_min:
        return None
    part = min(PART_MAX, max(part_min, -(-size // (connections * PARTS_PER_CONNECTION))))
    return [(s, min(size, s + part)) for s in range(0, size, part)]


def record_path(partial):
    return partial + ".parts"


def frontier(parts):
    """End of the contiguous written prefix."""
    for p in parts:
        if not p.complete:
            return p.start + p.done
    return parts[-1].end if parts else 0


def read_record(partial, size):
    """The parts of an interrupted parallel download, or None if there is no usable record.
    No part claims more than the partial file holds."""
    try:
        with open(record_path(partial)) as f:
            rec = json.load(f)
        have = os.path.getsize(partial)
    except (OSError, ValueError):
        return None
    try:
        parts = [Part(int(s), int(e), int(d)) for s, e, d in rec["parts"]]
    except (KeyError, TypeError, ValueError):
        return None
    if (rec.get("size") != size or not parts or parts[0].start != 0 or parts[-1].end != size
            or any(a.end != b.start for a, b in itertools.pairwise(parts))
            or any(p.length <= 0 or not 0 <= p.done <= p.length for p in parts)):
        return None
    for p in parts:
        p.done = min(p.done, max(0, have - p.start))
    return parts


def collapse_record(partial, size):
    """Turn a parallel download's partial file into a plain prefix (for a one-connection
    resume): cut it at the contiguous written prefix and drop the record."""
    path = record_path(partial)
    if not os.path.exists(path):
        return
    parts = read_record(partial, size)
    keep = frontier(parts) if parts else 0
    if os.path.exists(partial):
        os.truncate(partial, keep)
    os.unlink(path)


class ParallelJob:
    """A blob's parts fetched over `connections` connections into one partial file."""

    def __init__(self, job, connections, bounds, piece=HASH_BLOCK):
        # `job` is download._Job: the blob, its store paths, state, progress and deadline.
        self.job = job
        self.connections = connections
        self.bounds = bounds
        self.piece = piece
        self.record = record_path(job.partial)
        self.parts = None
        self.have = 0
        self.chunks = ChunkHasher()

    def resume(self):
        """Pick up an earlier attempt's parts (or a one-connection prefix)."""
        job = self.job
        parts = read_record(job.partial, job.size)
        if parts is None:
            prefix = job.prefix()
            parts = [Part(s, e, min(e - s, max(0, prefix - s))) for s, e in self.bounds]
        self.parts = parts
        self.have = sum(p.done for p in parts)
        if self.have:
            log.info("resuming %s: %d of %d bytes in %d parts", job.digest, self.have, job.size, len(parts))
        job.state.done = self.have
        job.progress.update(self.have)

    def discard(self):
        """Drop everything written: the next attempt starts from zero."""
        try:
            os.unlink(self.record)
        except FileNotFoundError:
            pass
        self.job.discard()
        self.parts = [Part(s, e) for s, e in self.bounds]
        self.have = 0

    def install(self):
        self.job.install()

    def run(self):
        job = self.job
        self.chunks.abandon()
        self.chunks = ChunkHasher()
        hasher = hashlib.sha256()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._error = None
        # Set when a part completes (record it now) and when the workers are done.
        self._wake = threading.Event()
        self._workers_done = False
        self._todo = [p for p in self.parts if not p.complete]
        fd = os.open(job.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A record before any byte is written: a partial file with parts always has one, so
            # it is never taken for a plain prefix (its holes would read as data).
            self._save(fd)
            hashing = _Thread(self._hash, fd, hasher)
            syncing = _Thread(self._sync, fd)
            workers = [_Thread(self._work, fd) for _ in range(min(self.connections, len(self._todo)))]
            for w in workers:
                w.join()
            self._workers_done = True
            self._wake.set()
            syncing.join()
            if self._error is None:
                os.fsync(fd)
            else:
                self._stop.set()
                with self._lock:
                    self._lock.notify_all()
            hashing.join()
            if self._error is not None:
                try:
                    self._save(fd)
                except OSError as e:
                    log.warning("could not record the parts of %s (%s); a retry refetches them",
                                job.digest, e)
                raise self._error
            if hashing.error is not None:
                raise hashing.error
        finally:
            os.close(fd)
        actual = hasher.hexdigest()
        if actual != job.hexdigest:
            raise DigestMismatch(job.digest, actual)
        try:
            os.unlink(self.record)
        except FileNotFoundError:
            pass

    def _next(self):
        with self._lock:
            return self._todo.pop(0) if self._todo and not self._stop.is_set() else None

    def _fail(self, error):
        """The first failure stops every connection; the attempt raises it."""
        with self._lock:
            if self._error is None:
                self._error = error
            self._stop.set()
            self._lock.notify_all()

    def _work(self, fd):
        while True:
            part = self._next()
            if part is None:
                return
            try:
                self._fetch(part, fd)
            except BaseException as e:  # noqa: B036 - handed to the attempt
                self._fail(e)
                return
            self._wake.set()

    def _sync(self, fd):
        """Every SAVE_EVERY seconds, and when a part completes: sync the data, then record the
        parts. Off the connections' threads, so they never wait on the disk; and the final
        fsync finds little left to write."""
        while not self._workers_done and not self._stop.is_set():
            self._wake.wait(SAVE_EVERY)
            self._wake.clear()
            if self._workers_done or self._stop.is_set():
                return
            try:
                self._save(fd)
            except BaseException as e:  # noqa: B036 - handed to the attempt
                self._fail(e)
                return

    def _fetch(self, part, fd):
        job = self.job
        start, end = part.start + part.done, part.end - 1
        resp = job.client.open_blob(job.ref, job.digest, start=start, end=end)
        with resp:
            if resp.status_code == 200:
                raise RangesUnsupported()
            if resp.status_code != 206:
                raise RegistryHTTPError(resp.status_code, resp.url)
            check_content_range(resp, start, end)
            try:
                for piece in resp.iter_content(self.piece):
                    if self._stop.is_set():
                        return
                    if part.done + len(piece) > part.length:
                        raise DownloadError("more bytes than asked for in bytes %d-%d" % (start, end),
                                            cause="size mismatch")
                    _pwrite_all(fd, piece, part.start + part.done)
                    with self._lock:
                        part.done += len(piece)
                        job.state.done += len(piece)
                        job.state.received += len(piece)
                        job.progress.update(len(piece))
                        self._lock.notify_all()
                    if job.deadline is not None and job.clock() > job.deadline:
                        raise RepairTimeout()
            except requests.RequestException as e:
                raise NetworkError("reading bytes %d-%d of %s at byte %d: %s"
                                   % (start, end, job.digest, part.start + part.done, e)) from e
        if not part.complete:
            raise NetworkError("bytes %d-%d of %s ended at byte %d"
                               % (start, end, job.digest, part.start + part.done))

    def _hash(self, fd, hasher):
        """Hash the contiguous written prefix as it grows, until the whole blob is hashed."""
        buf = bytearray(HASH_BLOCK)
        view = memoryview(buf)
        pos, size = 0, self.job.size
        while pos < size:
            with self._lock:
                while frontier(self.parts) <= pos and not self._stop.is_set():
                    self._lock.wait()
                limit = frontier(self.parts)
            if limit <= pos:
                return
            while pos < limit:
                n = os.preadv(fd, [view[:min(len(buf), limit - pos)]], pos)
                if n <= 0:
                    raise DownloadError("partial file shorter than its parts say", cause="store error")
                hasher.update(view[:n])
                self.chunks.update(view[:n])
                pos += n

    def _save(self, fd):
        """Record each part's progress. The data is synced first, so the record never claims
        bytes the disk lacks."""
        with self._lock:
            snapshot = [[p.start, p.end, p.done] for p in self.parts]
        try:
            os.fdatasync(fd)
            write_atomically(self.record, json.dumps({"size": self.job.size, "parts": snapshot}).encode())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage() from e
            raise


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage() from e
        raise


class _Thread(threading.Thread):
    """A thread that keeps what its target raised."""

    def __init__(self, target, *args):
        super().__init__(daemon=True, name="download-part")
        self._target_fn, self._args, self.error = target, args, None
        self.start()

    def run(self):
        try:
            self._target_fn(*self._args)
        except BaseException as e:  # noqa: B036 - handed to the joining thread
            self.error = e
