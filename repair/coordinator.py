"""The repair coordinator: guard a model before use, and repair it once however many requests wait."""

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass

from repair.download import DownloadState, disk_free, fetch_blob
from repair.errors import (
    DownloadError,
    InsufficientStorage,
    LLMNodeError,
    ModelCorrupted,
    ModelNotFound,
    RepairBusy,
    RepairTimeout,
)
from repair.metrics import Metrics
from repair.patch import patch_blob
from repair.progress import LoggingProgress
from repair.singleflight import SingleFlight
from repair.store import ManifestInvalid, model_layer, parse_manifest
from repair.verify import BlobCorrupted

log = logging.getLogger("llmnode.repair")


@dataclass
class Resolved:
    """A model ready to load: its weights blob, and whether this call had to repair it."""

    ref: object
    path: str
    repaired: bool


@dataclass
class ActiveRepair:
    model: str
    state: DownloadState


class RepairCoordinator:
    """Resolves a model to a verified blob, repairing the blob or manifest from the registry."""

    def __init__(self, store, client, guard, auto_repair=True, timeout_secs=300,
                 clock=time.monotonic, free_space=disk_free, retry=None, max_waiters=48,
                 metrics=None, connections=1):
        self.store = store
        self.client = client
        self.guard = guard
        self.auto_repair = auto_repair
        self.timeout_secs = timeout_secs
        self.clock = clock
        self.free_space = free_space
        self.retry = retry
        self.max_waiters = max_waiters
        self.connections = connections
        self.metrics = metrics or Metrics()
        self.blob_flights = SingleFlight("repair")
        self.manifest_flights = SingleFlight("manifest")
        # digest -> ActiveRepair; written by flight threads, read by /health.
        self._active = {}
        # Guards _waiting (digest -> requests waiting on its check or repair).
        self._lock = threading.Lock()
        self._waiting = {}
        # str(ref) -> (stat stamp, manifest) of manifests read and checked; a rewrite changes
        # the stamp (ctime moves on any write), so a changed file is read and checked again.
        self._manifests = {}

    def active(self):
        """Repairs in progress, for /health."""
        with self._lock:
            waiting = dict(self._waiting)
        return [{"model": a.model, "digest": d, "bytes_done": a.state.done,
                 "bytes_total": a.state.total, "waiting_requests": waiting.get(d, 0)}
                for d, a in list(self._active.items())]

    def ensure(self, ref, on_change=None, full=False):
        """The model's verified weights; repairs first if needed. `on_change(path)` runs
        before any full check of a blob that changed since it was verified."""
        manifest = self.manifest(ref)
        layer = model_layer(manifest)
        path = self.store.blob_path(layer["digest"])
        if not full and self.guard.unchanged(layer):
            return Resolved(ref, path, False)
        if on_change:
            on_change(path)
        return Resolved(ref, path, self.check_layer(ref, layer, gguf=True))

    def check_layer(self, ref, layer, gguf=False):
        """Full check of one blob, repaired if corrupted; True if it was repaired. One run per
        digest however many callers ask; each waits at most LLM_REPAIR_TIMEOUT_SECS."""
        digest = layer["digest"]
        with self._lock:
            if sum(self._waiting.values()) >= self.max_waiters:
                raise RepairBusy("Model '%s' is being checked or repaired and %d requests already "
                                 "wait (LLM_MAX_REPAIR_WAITERS); retry shortly" % (ref, self.max_waiters))
            self._waiting[digest] = self._waiting.get(digest, 0) + 1
        try:
            flight, _ = self.blob_flights.submit(digest, lambda: self._check_blob(ref, layer, gguf))
            return self._wait(flight)
        finally:
            with self._lock:
                self._waiting[digest] -= 1
                if not self._waiting[digest]:
                    del self._waiting[digest]

    def manifest(self, ref):
        """The model's manifest; a missing (but once known) or unparseable one is fetched again."""
        stamp = _stamp(self.store.manifest_path(ref))
        cached = self._manifests.get(str(ref))
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            raw = self.store.read_manifest_raw(ref)
            manifest = parse_manifest(raw)
            known = self.guard.records.manifest_digest(ref)
            actual = hashlib.sha256(raw).hexdigest()
            if known is None:
                self.guard.records.record_manifest(ref, actual)
            elif known != actual:
                raise ManifestInvalid("manifest of %s changed since it was pulled" % ref)
            self._manifests[str(ref)] = (stamp, manifest)
            return manifest
        except ModelNotFound:
            if self.guard.records.manifest_digest(ref) is None:
                raise
            problem = "manifest missing"
        except ManifestInvalid as e:
            problem = "manifest unusable (%s)" % e
        log.warning("%s: %s", ref, problem)
        flight, _ = self.manifest_flights.submit(str(ref), lambda: self._repair_manifest(ref))
        return self._wait(flight)

    def _wait(self, flight):
        try:
            return flight.result(self.timeout_secs, clock=self.clock)
        except TimeoutError:
            raise RepairTimeout() from None

    def _check_blob(self, ref, layer, gguf):
        """Runs once per digest: full check, then a repair if the blob is corrupted."""
        try:
            self.guard.verify(layer, gguf=gguf)
            return False
        except BlobCorrupted as e:
            log.warning("model %s: blob %s is corrupted: %s", ref, layer["digest"], e.reason)
            if not self.auto_repair:
                raise ModelCorrupted(
                    "Model '%s' is corrupted (%s) and auto-repair is disabled "
                    "(LLM_AUTO_REPAIR=false); run `python llmnode.py repair %s`"
                    % (ref, e.reason, ref)) from e
            bad = e.bad_chunks
        self._repair(ref, lambda deadline: self._download(ref, layer, deadline, bad), layer)
        return True

    def _repair_manifest(self, ref):
        if not self.auto_repair:
            raise ModelCorrupted("Model '%s' has a missing or unusable manifest and auto-repair "
                                 "is disabled (LLM_AUTO_REPAIR=false); run `python llmnode.py "
                                 "repair %s`" % (ref, ref))

        def fetch(_deadline):
            raw = self.client.get_manifest(ref)
            manifest = parse_manifest(raw)
            self.store.write_manifest(ref, raw)
            self.guard.records.record_manifest(ref, hashlib.sha256(raw).hexdigest())
            return manifest

        return self._repair(ref, fetch, None)

    def _repair(self, ref, work, layer):
        """Run one repair with the SPEC's log lines; every failure becomes a SPEC error."""
        log.info("Starting auto-repair for model: %s", ref)
        self.metrics.inc("llmnode_repairs_started_total")
        self.metrics.inc("llmnode_repairs_in_progress")
        started = self.clock()
        deadline = started + self.timeout_secs
        try:
            result = work(deadline)
        except Exception as e:
            self.metrics.inc("llmnode_repairs_failed_total")
            log.error("Auto-repair failed: %s: %s", ref, e)
            if isinstance(e, (DownloadError, InsufficientStorage, RepairTimeout)):
                raise
            cause = "store error" if isinstance(e, OSError) else "registry error"
            raise DownloadError(str(e), cause=cause) from e
        finally:
            self.metrics.inc("llmnode_repairs_in_progress", -1)
            if layer is not None:
                self._active.pop(layer["digest"], None)
        self.metrics.inc("llmnode_repairs_completed_total")
        log.info("Auto-repair completed: %s (elapsed: %ds)", ref, round(self.clock() - started))
        return result

    def _download(self, ref, layer, deadline, bad_chunks=None):
        state = DownloadState(layer["digest"], layer["size"])
        self._active[layer["digest"]] = ActiveRepair(str(ref), state)
        table = self.guard.table(layer) if bad_chunks else None
        # When every chunk is bad, a plain download (which resumes) does the same work better.
        if table and len(bad_chunks) < len(table):
            try:
                patch_blob(self.client, self.store, ref, layer, table, bad_chunks, state,
                                     deadline=deadline, clock=self.clock, retry=self.retry,
                                     sleep=_sleep_until(deadline, self.clock))
                log.info("model %s: %d damaged chunk(s) fetched again by range (%d bytes)",
                         ref, len(bad_chunks), state.received)
                self.metrics.inc("llmnode_download_bytes_total", state.received)
                self.guard.record_installed(layer)
                return
            except (LLMNodeError, OSError) as e:
                self.metrics.inc("llmnode_download_bytes_total", state.received)
                log.warning("model %s: range repair failed (%s); downloading the whole blob", ref, e)
                state = DownloadState(layer["digest"], layer["size"])
                self._active[layer["digest"]] = ActiveRepair(str(ref), state)
        try:
            with LoggingProgress(str(ref), layer["size"]) as bar:
                fetch_blob(self.client, self.store, ref, layer, state=state, progress=bar,
                           retry=self.retry, free_space=self.free_space, deadline=deadline,
                           clock=self.clock, sleep=_sleep_until(deadline, self.clock),
                           connections=self.connections)
        finally:
            self.metrics.inc("llmnode_download_bytes_total", state.received)
        self.guard.record_installed(layer, state.chunk_digests)


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _sleep_until(deadline, clock):
    """A backoff sleep that gives up rather than outlive the repair's deadline."""
    def sleep(seconds):
        if clock() + seconds > deadline:
            raise RepairTimeout()
        time.sleep(seconds)
    return sleep
