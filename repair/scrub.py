"""Scrub: re-verify every blob in the background so bit rot is found without waiting for a request."""

import logging
import os
import threading
import time

from repair.errors import LLMNodeError
from repair.metrics import Metrics

log = logging.getLogger("llmnode.scrub")


class Scrubber:
    """Every `interval` seconds, a full check of every model's manifest and every blob it
    names (weights, template, system, params, license, projector, config), at low CPU
    priority, through the repair coordinator (one check per blob however many ask; a
    corrupted or unreadable blob is repaired or reported). No failure ends the scrubber; it
    runs on a daemon thread for the life of the process."""

    def __init__(self, store, coordinator, interval, metrics=None):
        self.store = store
        self.coordinator = coordinator
        self.interval = interval
        self.metrics = metrics or Metrics()
        self.passes = 0

    def start(self):
        threading.Thread(target=self._loop, name="scrub", daemon=True).start()
        return self

    def _loop(self):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        while True:
            time.sleep(self.interval)
            try:
                self.run_once()
            except Exception:
                self.metrics.inc("llmnode_scrub_errors_total")
                log.exception("scrub: pass failed; the next pass runs in %ds", self.interval)

    def run_once(self):
        """One pass; returns (model, digest or None, what happened) for each blob or manifest
        that was not intact."""
        findings = []
        for ref in self.store.models():
            try:
                repaired = self.coordinator.check_model(ref)
                findings += [(str(ref), digest, "repaired") for digest in repaired]
            except LLMNodeError as e:
                log.error("scrub: model %s not repaired: %s", ref, e)
                findings.append((str(ref), getattr(e, "digest", None), str(e)))
            except Exception as e:
                # One model's unexpected failure (a bug, a failing disk) must not stop the rest.
                self.metrics.inc("llmnode_scrub_errors_total")
                log.exception("scrub: model %s: unexpected error", ref)
                findings.append((str(ref), None, repr(e)))
        self.passes += 1
        self.metrics.inc("llmnode_scrub_passes_total")
        log.info("scrub: pass %d done, %d problem(s) found", self.passes, len(findings))
        return findings
