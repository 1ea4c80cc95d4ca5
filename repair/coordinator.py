"""The repair coordinator: guard a model's blobs and manifest before use, and repair each once
however many requests wait; manifests are pinned at their first use. The store operations
(pull, delete, copy) are in `repair.operations`."""

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass

from repair.download import DownloadState, disk_free, fetch_blob, patch_blob
from repair.errors import (
    DigestMismatch,
    DownloadError,
    LLMNodeError,
    ManifestInvalid,
    ModelCorrupted,
    ModelNotFound,
    RangesUnsupported,
    RepairBusy,
    RepairTimeout,
)
from repair.locks import FileLock
from repair.metrics import Metrics
from repair.progress import LoggingProgress
from repair.records import claimed_by_pulls
from repair.singleflight import SingleFlight
from repair.store import (
    layer_kind,
    layers_to_check,
    model_layer,
    parse_manifest,
    stat_stamp,
    text_layers,
)
from repair.verify import read_checked

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
                 metrics=None, connections=1, progress=LoggingProgress):
        self.store = store
        self.client = client
        self.guard = guard
        self.records = guard.records
        self.auto_repair = auto_repair
        self.timeout_secs = timeout_secs
        self.clock = clock
        self.free_space = free_space
        self.retry = retry
        self.max_waiters = max_waiters
        self.connections = connections
        # progress(label, total) -> a tqdm-like bar for each download (a terminal bar for `pull`).
        self.progress = progress
        self.metrics = metrics or Metrics()
        self.blob_flights = SingleFlight("repair")
        self.manifest_flights = SingleFlight("manifest")
        # Guards _waiting (digest -> requests waiting on its check or repair) and _active
        # (digest -> ActiveRepair; written by flight threads, read by /health).
        self._lock = threading.Lock()
        self._waiting = {}
        self._active = {}
        # str(ref) -> (stat stamp, manifest) of manifests read and checked, and digest ->
        # (stat stamp, bytes) of small layers read and checked: any write to a file (even one
        # that puts its times back) moves its ctime, so a changed file is read and checked again.
        # No lock: each is touched only by single get/set/pop calls (atomic under the GIL), and
        # an entry's stamp is taken before its file is read, so an entry lost to a racing
        # writer, or stored after a newer one, costs one more read and check, never a wrong
        # answer: a stale stamp never matches the file as it is now.
        self._manifests = {}
        self._layers = {}

    def active(self):
        """Repairs in progress, for /health."""
        with self._lock:
            waiting = dict(self._waiting)
            active = dict(self._active)
        return [{"model": a.model, "digest": d, "bytes_done": a.state.done,
                 "bytes_total": a.state.total, "waiting_requests": waiting.get(d, 0)}
                for d, a in active.items()]

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

    def check_layer(self, ref, layer, gguf=False, pulling=False):
        """Full check of one blob, repaired if corrupted; True if it was repaired. One run per
        digest however many callers ask; each waits at most LLM_REPAIR_TIMEOUT_SECS. A pull
        (`pulling`) fetches a missing or corrupted blob whatever LLM_AUTO_REPAIR says."""
        digest = layer["digest"]
        with self._lock:
            if sum(self._waiting.values()) >= self.max_waiters:
                raise RepairBusy("Model '%s' is being checked or repaired and %d requests already "
                                 "wait (LLM_MAX_REPAIR_WAITERS); retry shortly" % (ref, self.max_waiters))
            self._waiting[digest] = self._waiting.get(digest, 0) + 1
        try:
            flight, _ = self.blob_flights.submit(
                digest, lambda: self._check_blob(ref, layer, gguf, pulling))
            return self._wait(flight)
        finally:
            with self._lock:
                self._waiting[digest] -= 1
                if not self._waiting[digest]:
                    del self._waiting[digest]

    def manifest(self, ref):
        """The model's manifest; a missing (but once known) or unparseable one is fetched again."""
        stamp = stat_stamp(self.store.manifest_path(ref))
        cached = self._manifests.get(str(ref))
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            raw = self.store.read_manifest_raw(ref)
            manifest = parse_manifest(raw)
            known = self.records.manifest_digest(ref)
            actual = hashlib.sha256(raw).hexdigest()
            if known is None:
                self._pin_first_use(ref, actual)
            elif known != actual:
                raise ManifestInvalid("manifest of %s changed since it was pulled" % ref)
            self._manifests[str(ref)] = (stamp, manifest)
            return manifest
        except ModelNotFound:
            if self.records.manifest_digest(ref) is None:
                raise
            problem = "manifest missing"
        except ManifestInvalid as e:
            problem = "manifest unusable (%s)" % e
        log.warning("%s: %s", ref, problem)
        flight, _ = self.manifest_flights.submit(str(ref), lambda: self._repair_manifest(ref))
        return self._wait(flight)

    def _pin_first_use(self, ref, hexdigest):
        """Pin a manifest no pull pinned (a store Ollama wrote) at its first use, unless a delete
        removed it meanwhile: a pin without a manifest would bring a deleted model back."""
        with self.records.changing() as data:
            if data["manifests"].get(str(ref)) is not None or not os.path.exists(
                    self.store.manifest_path(ref)):
                data["unchanged"] = True
                return
            data["manifests"][str(ref)] = hexdigest

    def layer_bytes(self, ref, layer):
        """The bytes of a small layer (template, system, params, license, config), checked
        against its digest each time they are read from disk; an unchanged file (same stat
        stamp) is not read again. A bad layer is repaired first, as the weights are."""
        digest = layer["digest"]
        path = self.store.blob_path(digest)
        cached = self._layers.get(digest)
        if cached is not None and cached[0] is not None and cached[0] == stat_stamp(path):
            return cached[1]
        for attempt in range(2):
            stamp = stat_stamp(path)
            try:
                data = read_checked(path, digest, layer["size"])
            except ModelCorrupted:
                if attempt:
                    raise
                # The same full check, single-flight repair, log lines and errors as the weights.
                self.check_layer(ref, layer)
                continue
            self._layers[digest] = (stamp, data)
            return data

    def layer_texts(self, ref, manifest=None):
        """kind -> verified text of each of the model's template, system, params and license
        layers (repaired first if need be)."""
        manifest = manifest or self.manifest(ref)
        return {kind: self.layer_bytes(ref, layer).decode("utf-8", "replace")
                for kind, layer in text_layers(manifest)}

    def _wait(self, flight):
        try:
            return flight.result(self.timeout_secs, clock=self.clock)
        except TimeoutError:
            raise RepairTimeout() from None

    def _check_blob(self, ref, layer, gguf, pulling=False):
        """Runs once per digest: full check, then a repair if the blob is corrupted."""
        try:
            self.guard.verify(layer, gguf=gguf)
            return False
        except ModelCorrupted as e:
            if not (pulling and e.reason == "missing"):
                log.warning("model %s: blob %s is corrupted: %s", ref, layer["digest"], e.reason)
            if not self.auto_repair and not pulling:
                raise ModelCorrupted(e.path, e.reason, message=(
                    "Model '%s' is corrupted (%s) and auto-repair is disabled "
                    "(LLM_AUTO_REPAIR=false); run `python llmnode.py repair %s`"
                    % (ref, e.reason, ref))) from e
            bad = e.bad_chunks
            fresh = pulling and e.reason == "missing"
        self._repair(ref, lambda deadline: self._download(ref, layer, deadline, bad, gguf), layer,
                     fresh=fresh)
        return True

    def _repair_manifest(self, ref):
        if not self.auto_repair:
            raise ModelCorrupted(self.store.manifest_path(ref), "missing or unusable", message=(
                "Model '%s' has a missing or unusable manifest and auto-repair is disabled "
                "(LLM_AUTO_REPAIR=false); run `python llmnode.py repair %s`" % (ref, ref)))

        def fetch(_deadline):
            pin = self.records.manifest_digest(ref)
            if pin is None:
                # A store pulled by another tool (Ollama) has no pin: the tag is used once, and
                # what it gives is pinned from now on.
                raw = self.client.get_manifest(ref)
                log.warning("model %s had no pinned manifest digest; fetched its tag and pinned "
                            "sha256:%s", ref, hashlib.sha256(raw).hexdigest())
            else:
                raw = self.client.get_manifest(ref, digest="sha256:" + pin)
                actual = hashlib.sha256(raw).hexdigest()
                if actual != pin:
                    raise DigestMismatch("sha256:" + pin, actual)
            manifest = parse_manifest(raw)
            with self.records.changing() as data:
                if pin is not None and data["manifests"].get(str(ref)) != pin:
                    raise ModelNotFound(str(ref))  # deleted (or pulled anew) meanwhile
                self.store.write_manifest(ref, raw)
                data["manifests"][str(ref)] = hashlib.sha256(raw).hexdigest()
            return manifest

        return self._repair(ref, fetch, None)

    def _repair(self, ref, work, layer, fresh=False):
        """Run one repair with the SPEC's log lines (a first download, `fresh`, logs as a pull);
        a failure becomes a SPEC error, and an unexpected one is a bug: 500, traceback logged."""
        if fresh:
            log.info("pulling %s (%s)", layer["digest"], ref)
        else:
            log.info("Starting auto-repair for model: %s", ref)
            self.metrics.inc("llmnode_repairs_started_total")
        self.metrics.inc("llmnode_repairs_in_progress")
        started = self.clock()
        deadline = started + self.timeout_secs
        try:
            result = work(deadline)
        except Exception as e:
            if not fresh:
                self.metrics.inc("llmnode_repairs_failed_total")
            if isinstance(e, LLMNodeError) and e.status != 500:
                log.error("%s failed: %s: %s", "Pull" if fresh else "Auto-repair", ref, e)
                raise
            if isinstance(e, OSError):
                log.error("%s failed: %s: store error (%s)", "Pull" if fresh else "Auto-repair", ref, e)
                raise DownloadError(str(e), cause="store error") from e
            log.exception("%s failed: %s: unexpected error", "Pull" if fresh else "Auto-repair", ref)
            raise LLMNodeError("Internal error while repairing model '%s': %r" % (ref, e)) from e
        finally:
            self.metrics.inc("llmnode_repairs_in_progress", -1)
            if layer is not None:
                with self._lock:
                    self._active.pop(layer["digest"], None)
        if not fresh:
            self.metrics.inc("llmnode_repairs_completed_total")
            log.info("Auto-repair completed: %s (elapsed: %ds)", ref, round(self.clock() - started))
        return result

    # One path for every caller that checks or fetches whole models: requests (above), the
    # scrubber, and the pull, repair and verify commands.

    def check_model(self, ref):
        """Full check of a model's manifest and every blob, each repaired if it is corrupted
        or missing; the digests repaired."""
        manifest = self.manifest(ref)
        repaired = []
        for layer, gguf in layers_to_check(manifest):
            if self.check_layer(ref, layer, gguf=gguf):
                repaired.append(layer["digest"])
        return repaired

    def verify_model(self, ref):
        """Full check, repairing nothing: (layer or None for the manifest, problem or None)."""
        try:
            manifest = self.store.read_manifest(ref)
        except LLMNodeError as e:
            return [(None, str(e))]
        results = []
        for layer, gguf in layers_to_check(manifest):
            try:
                self.guard.verify(layer, gguf=gguf)
                results.append((layer, None))
            except ModelCorrupted as e:
                results.append((layer, e.reason))
        return results

    def forget(self, ref, digests=()):
        """Drop what is remembered of a model's manifest and of `digests`' small layers, after
        a store operation changed them."""
        self._manifests.pop(str(ref), None)
        for digest in digests:
            self._layers.pop(digest, None)

    def progress_of(self, digest):
        """Bytes of a blob downloaded so far, if it is being downloaded now."""
        with self._lock:
            active = self._active.get(digest)
        return active.state.done if active is not None else None

    def _download(self, ref, layer, deadline, bad_chunks=None, gguf=False):
        """Fetch a blob again, holding its cross-process lock for the whole write and install:
        another writer (a command, a second node) waits here, then finds the blob installed."""
        lock = FileLock(self.store.lock_path(layer["digest"]), clock=self.clock)
        self.store.ensure_dirs()
        lock.acquire(deadline, on_wait=lambda: log.info(
            "model %s: blob %s is being written by another writer; waiting for it", ref, layer["digest"]))
        try:
            # A delete holds this lock while it decides; a blob it removed is not brought back.
            if layer["digest"] not in self.store.named_digests() | claimed_by_pulls(self.records.snapshot()):
                raise ModelNotFound(str(ref))
            if lock.waited:
                try:
                    self.guard.verify(layer, gguf=gguf)
                    log.info("model %s: blob %s was installed by another writer", ref, layer["digest"])
                    return
                except ModelCorrupted as e:
                    bad_chunks = e.bad_chunks
            self._download_locked(ref, layer, deadline, bad_chunks)
        finally:
            lock.release()

    def _track(self, ref, layer):
        """A fresh DownloadState for the blob, shown by /health until the repair ends."""
        state = DownloadState(layer["digest"], layer["size"])
        with self._lock:
            self._active[layer["digest"]] = ActiveRepair(str(ref), state)
        return state

    def _download_locked(self, ref, layer, deadline, bad_chunks):
        state = self._track(ref, layer)
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
            except (LLMNodeError, OSError, RangesUnsupported) as e:
                self.metrics.inc("llmnode_download_bytes_total", state.received)
                why = "the registry ignored a Range request" if isinstance(e, RangesUnsupported) else e
                log.warning("model %s: range repair failed (%s); downloading the whole blob", ref, why)
                state = self._track(ref, layer)
        try:
            kind = layer_kind(layer) or "blob"
            label = str(ref) if kind == "model" else "%s (%s)" % (ref, kind)
            with self.progress(label, layer["size"]) as bar:
                fetch_blob(self.client, self.store, ref, layer, state=state, progress=bar,
                           retry=self.retry, free_space=self.free_space, deadline=deadline,
                           clock=self.clock, sleep=_sleep_until(deadline, self.clock),
                           connections=self.connections)
        finally:
            self.metrics.inc("llmnode_download_bytes_total", state.received)
        self.guard.record_installed(layer, state.chunk_digests)


def _sleep_until(deadline, clock):
    """A backoff sleep that gives up rather than outlive the repair's deadline."""
    def sleep(seconds):
        if clock() + seconds > deadline:
            raise RepairTimeout()
        time.sleep(seconds)
    return sleep
