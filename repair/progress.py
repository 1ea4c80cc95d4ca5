"""Progress: a pull's steps as events, and each download's bytes as a tqdm bar on a terminal or
tqdm routed into `logging` every 10%."""

import io
import logging
import sys
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger("llmnode.repair")


@dataclass(frozen=True)
class PullEvent:
    """One step of a pull, for a dialect to render: `manifest` (fetching it), `blob` (one layer:
    `completed` of `total` bytes), `verify` (every blob checked), `write` (installing the
    manifest), `done`."""

    step: str
    digest: str = None
    total: int = None
    completed: int = None


class LoggingProgress(tqdm):
    """A tqdm counter that logs `Downloading model: NAME (P%)` at each `step` percent."""

    def __init__(self, label, total, step=10, logger=log):
        self._label = label
        self._step = step
        self._logger = logger
        self._logged = 0
        # display() below is the only output; what tqdm itself writes (a "\r" on close) goes
        # to a buffer nobody reads.
        super().__init__(total=total, file=io.StringIO(), mininterval=0, miniters=1,
                         unit="B", unit_scale=True, leave=False)

    def display(self, msg=None, pos=None):
        if not self.total:
            return True
        pct = int(self.n * 100 // self.total) // self._step * self._step
        if pct > self._logged:
            self._logged = pct
            self._logger.info("Downloading model: %s (%d%%)", self._label, pct)
        return True

    def reset(self, total=None):
        self._logged = 0
        super().reset(total)


def terminal_bar(label, total):
    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=True)


def progress_for(label, total):
    """A bar when stderr is a terminal, log lines otherwise."""
    return terminal_bar(label, total) if sys.stderr.isatty() else LoggingProgress(label, total)
