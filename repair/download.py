"""Blob download: chunks streamed into a partial file, hashed as written, resumed, then installed."""

import errno
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass

import requests

from repair import parts
from repair.chunks import ChunkHasher
from repair.errors import (
    BadRange,
    DigestMismatch,
    DownloadError,
    InsufficientStorage,
    NetworkError,
    RegistryHTTPError,
    RepairTimeout,
)
from repair.registry import check_content_range
from repair.retry import call_with_retries
from repair.store import digest_hex, fsync_dir
from repair.verify import CHUNK

# Network reads: at least 64 KiB, so progress and /health move smoothly on small blobs, and up
# to 1 MiB on large ones, where per-read Python overhead would otherwise show against curl.
NET_CHUNK = 64 << 10
NET_CHUNK_MAX = 1 << 20


def net_chunk(size):
    return min(NET_CHUNK_MAX, max(NET_CHUNK, size // 256))

log = logging.getLogger("llmnode.download")

# Room left on the disk after a download, so a repair never fills it to the last byte.
DISK_RESERVE = 1 << 20


@dataclass
class DownloadState:
    """Live state of one blob download; read by /health while it runs."""

    digest: str
    total: int
    done: int = 0
    received: int = 0
    attempts: int = 0
    chunk_digests: list = None


def disk_free(path):
    return shutil.disk_usage(path).free


class _NullProgress:
    def update(self, n):
        pass

    def reset(self):
        pass


def fetch_blob(client, store, ref, layer, *, state=None, progress=None, retry=None,
               sleep=time.sleep, free_space=disk_free, deadline=None, clock=time.monotonic,
               connections=1, part_min=parts.PART_MIN):
    """Download one layer into the store; return its DownloadState once installed. A blob of
    at least two parts of `part_min` bytes comes over up to `connections` connections."""
    digest, size = layer["digest"], layer["size"]
    hexdigest = digest_hex(digest)
    store.ensure_dirs()
    state = state or DownloadState(digest, size)
    job = _Job(client, store, ref, digest, hexdigest, size, state,
               progress or _NullProgress(), deadline, clock)
    bounds = parts.plan(size, connections, part_min)
    runner = parts.ParallelJob(job, connections, bounds, net_chunk(size)) if bounds else job
    runner.resume()
    need = size - runner.have + DISK_RESERVE
    if free_space(store.blobs_dir) < need:
        raise InsufficientStorage()

    def attempt():
        nonlocal runner
        state.attempts += 1
        try:
            try:
                return runner.run()
            except parts.RangesUnsupported:
                log.info("registry ignored a Range request for %s; downloading it over one "
                         "connection", digest)
                runner = job
                job.restart()
                job.resume()
                return job.run()
        except (DigestMismatch, BadRange):
            # Whatever is in the partial file is suspect now: the next try starts from zero.
            runner.discard()
            raise

    def on_retry(exc, policy, delay):
        log.warning("download of %s failed (%s); retry %d/%d in %.1fs",
                    digest, exc, policy.attempt, policy.total - 1, delay)

    try:
        call_with_retries(attempt, retry, sleep, on_retry)
    except BaseException:
        job.chunks.abandon()
        runner.chunks.abandon()
        raise
    state.chunk_digests = runner.chunks.digests()
    job.install()
    return state


class _Job:
    """One blob's partial file and the running hash of exactly the bytes in it."""

    def __init__(self, client, store, ref, digest, hexdigest, size, state, progress, deadline, clock):
        self.client, self.store, self.ref = client, store, ref
        self.digest, self.hexdigest, self.size = digest, hexdigest, size
        self.state, self.progress = state, progress
        self.deadline, self.clock = deadline, clock
        self.final = store.blob_path(digest)
        self.partial = store.partial_path(digest)
        self.hasher = hashlib.sha256()
        self.chunks = ChunkHasher()
        self.have = 0

    def prefix(self):
        """Bytes in the partial file; one longer than the blob is dropped."""
        try:
            have = os.path.getsize(self.partial)
        except FileNotFoundError:
            return 0
        if have > self.size:
            os.unlink(self.partial)
            return 0
        return have

    def resume(self):
        """Hash the prefix an earlier attempt left, so only the rest is fetched."""
        parts.collapse_record(self.partial, self.size)
        have = self.prefix()
        if have:
            with open(self.partial, "rb") as f:
                left = have
                while left:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        break
                    self.hasher.update(chunk)
                    self.chunks.update(chunk)
                    left -= len(chunk)
            log.info("resuming %s from byte %d of %d", self.digest, have, self.size)
        self.have = have
        self.state.done = have
        self.progress.update(have)

    def discard(self):
        try:
            os.unlink(self.partial)
        except FileNotFoundError:
            pass
        self.restart()

    def restart(self):
        self.hasher = hashlib.sha256()
        self.chunks.abandon()
        self.chunks = ChunkHasher()
        self.have = 0
        self.state.done = 0
        self.progress.reset()

    def run(self):
        if self.have == self.size and self.size > 0:
            return self.finish()
        resp = self.client.open_blob(self.ref, self.digest, start=self.have)
        with resp:
            if self.have and resp.status_code == 200:
                log.info("registry ignored the Range request for %s; starting from zero", self.digest)
                self.restart()
            elif self.have:
                check_content_range(resp, self.have)
            elif resp.status_code != 200:
                raise RegistryHTTPError(resp.status_code, resp.url)
            self.stream(resp)
        return self.finish()

    def stream(self, resp):
        try:
            with open(self.partial, "ab") as f:
                f.truncate(self.have)
                for chunk in resp.iter_content(net_chunk(self.size)):
                    if self.have + len(chunk) > self.size:
                        raise DownloadError("more than the %d bytes the manifest gives" % self.size,
                                            cause="size mismatch")
                    f.write(chunk)
                    self.hasher.update(chunk)
                    self.chunks.update(chunk)
                    self.have += len(chunk)
                    self.state.done = self.have
                    self.state.received += len(chunk)
                    self.progress.update(len(chunk))
                    if self.deadline is not None and self.clock() > self.deadline:
                        raise RepairTimeout()
                f.flush()
                os.fsync(f.fileno())
        except requests.RequestException as e:
            raise NetworkError("reading %s at byte %d: %s" % (self.digest, self.have, e)) from e
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage() from e
            raise

    def finish(self):
        if self.have < self.size:
            raise NetworkError("body ended at byte %d of %d" % (self.have, self.size))
        actual = self.hasher.hexdigest()
        if actual != self.hexdigest:
            raise DigestMismatch(self.digest, actual)

    def install(self):
        if self.size == 0 and not os.path.exists(self.partial):
            open(self.partial, "wb").close()
        os.replace(self.partial, self.final)
        fsync_dir(self.store.blobs_dir)
