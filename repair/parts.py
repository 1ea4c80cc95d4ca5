"""Parts of a parallel download: how a large blob is split, and the progress record beside its
partial file (`<partial>.parts`, JSON) that lets every part resume where it stopped.

A blob of at least two PART_MIN parts is split into parts of size / (4 x connections), kept
between 64 MiB and 1 GiB, each connection taking the next part in order (`Range: bytes=a-b`);
CDNs cap each connection's speed, so N connections come close to N times one (4 by default:
3.6x one connection under a per-connection cap in the bench, nothing lost on a slow shared link).
Each part is written in place in the partial file while one thread hashes the contiguous written
prefix (whole-file sha256 and chunk table), so the blob is not read again afterwards. The record
(each part's start, end and bytes written) is rewritten every second and at each part's end by a
background thread, after an fdatasync of the data: it never claims bytes the disk lacks, and the
connections never wait on the disk. After an error, a deadline, a SIGKILL or a power cut each part
resumes where the record says. A failure in any part stops every connection and the attempt is
retried, resuming; a whole-file digest that does not match or a wrong Content-Range discards the
partial file; a registry that answers a part with 200 gets the blob over one connection."""

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
