"""Parts of a parallel download: how a large blob is split, and the progress record beside its
partial file (`<partial>.parts`, JSON) that lets every part resume where it stopped."""

import itertools
import json
import os
from dataclasses import dataclass

from repair.store import write_atomically

# A blob is split only if it makes at least two parts of PART_MIN: below that, the extra
# requests buy nothing. Each connection gets about PARTS_PER_CONNECTION parts, so connections
# work near each other and the in-order hash trails the download closely.
PART_MIN = 64 << 20
PART_MAX = 1 << 30
PARTS_PER_CONNECTION = 4
# Seconds between progress records while parts are being written (and at each part's end).
SAVE_EVERY = 1.0


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

    def as_list(self):
        return [self.start, self.end, self.done]


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


def write_record(partial, size, snapshot):
    write_atomically(record_path(partial), json.dumps({"size": size, "parts": snapshot}).encode())


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
