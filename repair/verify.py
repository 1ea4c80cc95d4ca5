"""Blob checks: presence, size, GGUF header, and sha256 streamed in chunks."""

import hashlib
import os

from repair.errors import ModelCorrupted

GGUF_MAGIC = b"GGUF"


def check_present(path, size, gguf=False):
    """The blob's stat; ModelCorrupted if it is missing, not `size` long, or not a GGUF file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelCorrupted(path, "missing") from None
    if st.st_size != size:
        raise ModelCorrupted(path, "size %d, manifest says %d" % (st.st_size, size))
    if gguf:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelCorrupted(path, "not a GGUF file (bad header)")
    return st


def read_checked(path, digest, size):
    """The bytes of a small blob, read whole once and checked against its size and digest."""
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except FileNotFoundError:
        raise ModelCorrupted(path, "missing") from None
    except OSError as e:
        raise ModelCorrupted(path, "unreadable: %s" % e) from e
    if len(data) != size:
        raise ModelCorrupted(path, "size %d, manifest says %d" % (len(data), size))
    check_digest(path, digest, hashlib.sha256(data).hexdigest())
    return data


def check_digest(path, digest, actual_hex):
    if "sha256:" + actual_hex != digest:
        raise ModelCorrupted(path, "sha256 mismatch: expected %s, got sha256:%s" % (digest, actual_hex))
