"""Scrub: re-verify every blob in the background so bit rot is found without waiting for a request."""

import logging
import os
import threading

from repair.errors import LLMNodeError
from repair.store import blob_layers, model_layer
from repair.verify import BlobCorrupted

log = logging.getLogger("llmnode.scrub")


class Scrubber:
    """Every `interval` seconds, a full check of every blob of every model, at low CPU priority;
    what is corrupted goes to the repair coordinator (which repairs it or reports it)."""

    def __init__(self, store, guard, coordinator, interval, on_change=None):
        self.store = store
        self.guard = guard
        self.coordinator = coordinator
        self.interval = interval
        self.on_change = on_change
        self.passes = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="scrub", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def _loop(self):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        while not self._stop.wait(self.interval):
            self.run_once()

    def run_once(self):
        """One pass; returns the (model, digest, reason) of each corrupted blob found."""
        findings = []
        for ref in self.store.models():
            try:
                manifest = self.store.read_manifest(ref)
            except LLMNodeError as e:
                log.warning("scrub: model %s: manifest unusable: %s", ref, e)
                findings.append((str(ref), None, str(e)))
                continue
            weights = model_layer(manifest)
            for layer in blob_layers(manifest):
                if self._stop.is_set():
                    return findings
                try:
                    self.guard.verify(layer, gguf=layer is weights)
                    continue
                except BlobCorrupted as e:
                    log.warning("scrub: model %s: blob %s is corrupted: %s", ref, layer["digest"], e.reason)
                    findings.append((str(ref), layer["digest"], e.reason))
                if layer is weights and self.on_change:
                    self.on_change(self.store.blob_path(layer["digest"]))
                try:
                    self.coordinator.check_layer(ref, layer, gguf=layer is weights)
                except LLMNodeError as e:
                    log.error("scrub: model %s: blob %s not repaired: %s", ref, layer["digest"], e)
        self.passes += 1
        log.info("scrub: pass %d done, %d corrupted blob(s) found", self.passes, len(findings))
        return findings
