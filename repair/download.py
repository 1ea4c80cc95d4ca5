"""The byte pipeline: a blob's bytes for some ranges, from the registry client's checked iterator,
written at their offsets into this writer's partial file, hashed, then installed.

Three uses, one pipeline: a plain download is one range (resumed from the partial file's
prefix), a parallel download is N ranges over N connections (resumed from the parts record),
and a range repair is the damaged chunks (each checked against the chunk table). The deadline
and the byte counts wrap the chunk iterator; ENOSPC becomes InsufficientStorage in one place.

Hashing: a plain download hashes exactly the bytes it writes, from the iterator; a parallel
download's parts arrive out of order, so one thread hashes the contiguous prefix as it grows
(from the page cache, once); a range repair ends with the whole-file sha256, the authority, over
the patched file. While it is patched the blob sits as the partial file, never under its digest's
name; anything inconsistent (a chunk that does not match its table entry, a wrong Content-Range,
a whole digest that still differs) makes the coordinator fall back to a full download, as it
does at once when every chunk is bad.
"""

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm import tqdm

from repair import parts
from repair.chunks import ChunkHasher, chunk_range
from repair.errors import (
    BadRange,
    DigestMismatch,
    DownloadError,
    InsufficientStorage,
    NetworkError,
    RangesUnsupported,
    RepairTimeout,
)
from repair.hashing import sha256_file
from repair.retry import call_with_retries
from repair.store import digest_hex, fsync_dir

log = logging.getLogger("llmnode.download")

# Network reads: at least 64 KiB, so progress and /health move smoothly on small blobs, and up
# to 1 MiB on large ones, where per-read Python overhead would otherwise show against curl.
NET_CHUNK = 64 << 10
NET_CHUNK_MAX = 1 << 20
# Room left on the disk after a download, so a repair never fills it to the last byte.
DISK_RESERVE = 1 << 20
HASH_BLOCK = 1 << 20
# How long a parallel download's threads get to end once it stops: longer than a read can
# block (the registry client's read timeout, 30 s), so only a stuck thread outlives it.
STOP_GRACE_SECS = 60
JOIN_POLL_SECS = 1.0


def net_chunk(size):
    return min(NET_CHUNK_MAX, max(NET_CHUNK, size // 256))


def disk_free(path):
    return shutil.disk_usage(path).free


@dataclass
class DownloadState:
    """Live state of one blob download; read by /health while it runs."""

    digest: str
    total: int
    done: int = 0
    received: int = 0
    attempts: int = 0
    chunk_digests: list = None


# -- the stages every range goes through ------------------------------------------------------

def until(chunks, deadline, clock):
    """The chunks, until the repair's deadline passes."""
    for chunk in chunks:
        yield chunk
        if deadline is not None and clock() > deadline:
            raise RepairTimeout()


@contextmanager
def disk_errors():
    """A full disk (or quota) is InsufficientStorage wherever the pipeline writes."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage() from e
        raise


def write_range(fd, chunks, offset, counted):
    """Write each chunk at its offset, from `offset` on; `counted(chunk)` after each write.
    Returns the offset after the last byte."""
    with disk_errors():
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            counted(chunk)
    return offset


class Partial:
    """This writer's partial file of one blob (under `.llmnode/partial/`, held under the blob's
    lock by the caller) and its parts record."""

    def __init__(self, store, digest, size):
        self.store, self.digest, self.size = store, digest, size
        self.hexdigest = digest_hex(digest)
        self.path = store.partial_path(digest)
        self.final = store.blob_path(digest)
        self.record = parts.record_path(self.path)

    def prefix(self):
        """Bytes in the file; a file longer than the blob is dropped."""
        try:
            have = os.path.getsize(self.path)
        except FileNotFoundError:
            return 0
        if have > self.size:
            os.unlink(self.path)
            return 0
        return have

    def open(self):
        with disk_errors():
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def discard(self):
        for path in (self.path, self.record):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def install(self):
        """Rename the verified file to its digest's name (the caller holds the blob's lock)."""
        if self.size == 0 and not os.path.exists(self.path):
            open(self.path, "wb").close()
        os.replace(self.path, self.final)
        fsync_dir(self.store.blobs_dir)


# -- plain and parallel downloads -------------------------------------------------------------

def fetch_blob(client, store, ref, layer, *, state=None, progress=None, retry=None,
               sleep=time.sleep, free_space=disk_free, deadline=None, clock=time.monotonic,
               connections=1, part_min=parts.PART_MIN):
    """Download one layer into the store; return its DownloadState once installed. A blob of
    at least two parts of `part_min` bytes comes over up to `connections` connections."""
    store.ensure_dirs()
    state = state or DownloadState(layer["digest"], layer["size"])
    job = _Download(client, ref, Partial(store, layer["digest"], layer["size"]), state,
                    progress or tqdm(disable=True), deadline, clock,
                    parts.plan(layer["size"], connections, part_min), connections)
    job.resume()
    if free_space(store.blobs_dir) < layer["size"] - job.have + DISK_RESERVE:
        raise InsufficientStorage()

    def attempt():
        state.attempts += 1
        try:
            job.run()
        except (DigestMismatch, BadRange):
            # Whatever is in the partial file is suspect now: the next try starts from zero.
            job.discard()
            raise

    def on_retry(exc, policy, delay):
        log.warning("download of %s failed (%s); retry %d/%d in %.1fs",
                    layer["digest"], exc, policy.attempt, policy.total - 1, delay)

    try:
        call_with_retries(attempt, retry, sleep, on_retry)
    except BaseException:
        job.chunks.abandon()  # its helper thread ends with the attempt
        raise
    state.chunk_digests = job.chunk_digests
    job.partial.install()
    return state


class _Download:
    """One blob's ranges into its partial file, and the hashes of exactly the bytes in it."""

    def __init__(self, client, ref, partial, state, progress, deadline, clock, bounds, connections):
        self.client, self.ref, self.partial = client, ref, partial
        self.state, self.progress = state, progress
        self.deadline, self.clock = deadline, clock
        self.bounds, self.connections = bounds, connections
        self.parts = None  # [Part] while split into parts; None for one prefix
        self.have = 0
        self.hasher = hashlib.sha256()
        self.chunks = ChunkHasher()
        self.chunk_digests = None
        # Guards the parts' `done`, `state` and `progress` while connections write.
        self._lock = threading.Condition()

    def counted(self, part=None):
        def count(chunk):
            with self._lock:
                if part is not None:
                    part.done += len(chunk)
                self.state.done += len(chunk)
                self.state.received += len(chunk)
                self.progress.update(len(chunk))
                self._lock.notify_all()
        return count

    def resume(self):
        """Pick up what an earlier attempt (or process) left: the parts record, else a prefix."""
        self.parts = parts.read_record(self.partial.path, self.partial.size) if self.bounds else None
        if self.bounds and self.parts is None:
            prefix = self.partial.prefix()
            self.parts = [parts.Part(s, e, min(e - s, max(0, prefix - s))) for s, e in self.bounds]
        if self.parts is not None:
            self.have = sum(p.done for p in self.parts)
        else:
            self._collapse()
        if self.have:
            log.info("resuming %s from byte %d of %d", self.partial.digest, self.have, self.partial.size)
        self.state.done = self.have
        self.progress.update(self.have)

    def _collapse(self):
        """One connection from here: keep the contiguous prefix, hashed once as it stands."""
        parts.collapse_record(self.partial.path, self.partial.size)
        self.parts = None
        self.have = self.partial.prefix()
        self._restart_hashes()
        if self.have:
            with open(self.partial.path, "rb") as f:
                left = self.have
                while left:
                    block = f.read(min(HASH_BLOCK, left))
                    if not block:
                        break
                    self.hasher.update(block)
                    self.chunks.update(block)
                    left -= len(block)
        with self._lock:
            self.state.done = self.have

    def _restart_hashes(self):
        self.chunks.abandon()
        self.hasher, self.chunks = hashlib.sha256(), ChunkHasher()

    def discard(self):
        self.partial.discard()
        self._restart_hashes()
        self.have = 0
        self.parts = [parts.Part(s, e) for s, e in self.bounds] if self.bounds else None
        self.state.done = 0
        self.progress.reset()

    def run(self):
        if self.parts is not None:
            try:
                return self._run_parts()
            except RangesUnsupported:
                log.info("registry ignored a Range request for %s; downloading it over one "
                         "connection", self.partial.digest)
                self._collapse()
        return self._run_one()

    def _run_one(self):
        size = self.partial.size
        if self.have < size:
            chunks = self.client.blob_bytes(self.ref, self.partial.digest, start=self.have, total=size,
                                            chunk=net_chunk(size), whole_ok=True)
            fd = self.partial.open()
            try:
                with disk_errors():
                    os.ftruncate(fd, self.have)
                self.have = write_range(fd, until(self._hashed(chunks), self.deadline, self.clock),
                                        self.have, self.counted())
                with disk_errors():
                    os.fsync(fd)
            finally:
                os.close(fd)
        self._finish(self.hasher.hexdigest())

    def _hashed(self, chunks):
        for chunk in chunks:
            self.hasher.update(chunk)
            self.chunks.update(chunk)
            yield chunk

    def _finish(self, actual):
        digests = self.chunks.digests()
        if actual != self.partial.hexdigest:
            raise DigestMismatch(self.partial.digest, actual)
        self.chunk_digests = digests

    def _run_parts(self):
        """The parts not yet complete over up to `connections` connections (a _PartsRun)."""
        self._restart_hashes()
        self._finish(_PartsRun(self).run())
        try:
            os.unlink(self.partial.record)
        except FileNotFoundError:
            pass

    def _save(self, fd):
        """Record each part's progress; the data is synced first, so the record never claims
        bytes the disk lacks."""
        with self._lock:
            snapshot = [p.as_list() for p in self.parts]
        with disk_errors():
            os.fdatasync(fd)
            parts.write_record(self.partial.path, self.partial.size, snapshot)


class _PartsRun:
    """One attempt at a parallel download: worker threads take the parts in turn, each over
    its own connection; one thread hashes the contiguous written prefix as it grows (the
    parts arrive out of order); another syncs the data and then records the parts, every
    second and when a part completes. The first error stops them all."""

    def __init__(self, job):
        self.job = job
        self.hasher = hashlib.sha256()
        # `stop`: no more parts to write (all done, or the attempt failed); `failed`: the attempt
        # failed, so the hash stops too; `wake`: a part completed, record now.
        self.stop, self.failed, self.wake = threading.Event(), threading.Event(), threading.Event()
        # Both guarded by the job's lock (its Condition), as the parts are.
        self.errors = []
        self.todo = [p for p in job.parts if not p.complete]
        self.fd = job.partial.open()

    def run(self):
        """The hex sha256 of the whole blob once every part is written, synced and hashed;
        the first error raised otherwise (a registry that ignored a Range first)."""
        job = self.job
        threads = []
        try:
            # A record before any byte is written: a partial file with parts always has one, so
            # it is never taken for a plain prefix (its holes would read as data).
            job._save(self.fd)
            hashing = _Thread(self.hash_prefix, self.fail)
            syncing = _Thread(self.sync, self.fail)
            workers = [_Thread(self.work, self.fail)
                       for _ in range(min(job.connections, len(self.todo)))]
            threads = [*workers, syncing, hashing]
            # A worker ends with its parts, or at its first chunk past the deadline; this wait
            # ends at the deadline too, for a read that has not returned yet.
            if not _join(workers, job.deadline, job.clock):
                self.fail(RepairTimeout())
            self.stop.set()  # no more parts: stop the record thread
            self.wake.set()
            self._join_stopping([*workers, syncing])
            if not self.errors:
                with disk_errors():
                    os.fsync(self.fd)
            with job._lock:
                job._lock.notify_all()
            # Done, the hash catches up with the last bytes written (within the deadline);
            # failed, it ends at its next block.
            if not _join([hashing], job.deadline, job.clock):
                self.fail(RepairTimeout())
            self._join_stopping([hashing])
            if self.errors:
                self.save_after_failure()
                ranges_ignored = [e for e in self.errors if isinstance(e, RangesUnsupported)]
                raise ranges_ignored[0] if ranges_ignored else self.errors[0]
        finally:
            # A thread still running may write to the descriptor: closing it would let a file
            # opened later take that number, and the write. It is left open for that thread.
            if not any(t.is_alive() for t in threads):
                os.close(self.fd)
        return self.hasher.hexdigest()

    def _join_stopping(self, threads):
        """Threads told to stop end within one read (of the network, bounded by the client's
        read timeout, or of the disk); one that does not is stuck."""
        if not _join(threads, time.monotonic() + STOP_GRACE_SECS):
            raise DownloadError("a download thread of %s did not stop within %ds"
                                % (self.job.partial.digest, STOP_GRACE_SECS), cause="network error")

    def fail(self, error):
        with self.job._lock:
            self.errors.append(error)
            self.stop.set()
            self.failed.set()
            self.job._lock.notify_all()

    def work(self):
        """Write parts from `todo` until none is left or the attempt stops."""
        job = self.job
        while not self.stop.is_set():
            with job._lock:
                part = self.todo.pop(0) if self.todo else None
            if part is None:
                return
            self.write_part(part)
            self.wake.set()

    def write_part(self, part):
        job = self.job
        start = part.start + part.done
        chunks = job.client.blob_bytes(job.ref, job.partial.digest, start=start, end=part.end - 1,
                                       chunk=net_chunk(job.partial.size))
        write_range(self.fd, until(_stoppable(chunks, self.stop), job.deadline, job.clock), start,
                    job.counted(part))
        if not self.stop.is_set() and not part.complete:
            raise NetworkError("bytes %d-%d of %s ended at byte %d" % (
                start, part.end - 1, job.partial.digest, part.start + part.done))

    def sync(self):
        """Record the parts every SAVE_EVERY seconds and when a part completes."""
        while not self.stop.is_set():
            self.wake.wait(parts.SAVE_EVERY)
            self.wake.clear()
            if self.stop.is_set():
                return
            self.job._save(self.fd)

    def hash_prefix(self):
        """Hash the bytes from the start of the file up to the first byte not written yet, as
        that frontier moves."""
        job = self.job
        buf = bytearray(HASH_BLOCK)
        view, pos = memoryview(buf), 0
        while pos < job.partial.size:
            with job._lock:
                while parts.frontier(job.parts) <= pos and not self.stop.is_set():
                    # Woken by every counted chunk, by the end of the parts and by a failure.
                    job._lock.wait()
                limit = parts.frontier(job.parts)
            if limit <= pos or self.failed.is_set():
                return
            while pos < limit and not self.failed.is_set():
                n = os.preadv(self.fd, [view[:min(len(buf), limit - pos)]], pos)
                if n <= 0:
                    raise DownloadError("partial file shorter than its parts say", cause="store error")
                self.hasher.update(view[:n])
                job.chunks.update(view[:n])
                pos += n

    def save_after_failure(self):
        """Record what the failed attempt wrote, so a retry fetches only the rest."""
        try:
            self.job._save(self.fd)
        except OSError as e:
            log.warning("could not record the parts of %s (%s); a retry refetches them",
                        self.job.partial.digest, e)


def _join(threads, deadline, clock=time.monotonic):
    """Wait for `threads` to end until `deadline` (by `clock`; None: as long as they run);
    whether they all did. Rechecked every second, so an injected clock is followed."""
    for thread in threads:
        while thread.is_alive():
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                return False
            thread.join(JOIN_POLL_SECS if left is None else min(JOIN_POLL_SECS, left))
    return True


def _stoppable(chunks, stop):
    for chunk in chunks:
        if stop.is_set():
            return
        yield chunk


class _Thread(threading.Thread):
    """A thread that hands what its target raised to `fail`."""

    def __init__(self, target, fail):
        super().__init__(daemon=True, name="download-part")
        self._target_fn, self._fail = target, fail
        self.start()

    def run(self):
        try:
            self._target_fn()
        except BaseException as e:  # noqa: B036 - handed to the attempt
            self._fail(e)


# -- range repair -----------------------------------------------------------------------------

def patch_blob(client, store, ref, layer, table, bad, state, deadline=None, clock=time.monotonic,
               retry=None, sleep=time.sleep):
    """Replace the damaged chunks `bad` of a blob with the registry's bytes, in place, each
    checked against the chunk table before it is written; the blob counts as good only once
    its whole-file digest matches again (the table stays valid)."""
    partial = Partial(store, layer["digest"], layer["size"])
    # From here until the whole digest matches, nothing sits under the digest's name.
    os.replace(partial.final, partial.path)
    try:
        fd = partial.open()
        try:
            for index in bad:
                offset, length = chunk_range(index, layer["size"])

                def fetch(offset=offset, length=length):
                    return b"".join(until(client.blob_bytes(ref, layer["digest"], start=offset,
                                                            end=offset + length - 1), deadline, clock))

                data = call_with_retries(fetch, retry, sleep)
                # Wrong bytes from the registry are not retried here: the full download decides.
                actual = hashlib.sha256(data).digest()
                if actual != table[index]:
                    raise DigestMismatch("%s chunk %d" % (layer["digest"], index), actual.hex())
                write_range(fd, [data], offset, _count(state))
            with disk_errors():
                os.fsync(fd)
        finally:
            os.close(fd)
        # The whole-file digest is the authority: the chunks kept were read by the check that
        # found the damage, not since.
        whole = sha256_file(partial.path)
        if "sha256:" + whole != layer["digest"]:
            raise DigestMismatch(layer["digest"], whole)
    except BaseException:
        # Back where it was (no better, no worse: only verified chunks were written).
        os.replace(partial.path, partial.final)
        raise
    partial.install()


def _count(state):
    def count(chunk):
        state.received += len(chunk)
        state.done += len(chunk)
    return count
