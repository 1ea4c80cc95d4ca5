"""Blob checks: presence, size, GGUF header, and sha256 streamed in chunks."""

import hashlib
import os

from repair.errors import LLMNodeError

CHUNK = 1 << 20
GGUF_MAGIC = b"GGUF"


class BlobCorrupted(LLMNodeError):
    """A blob failed its check; `reason` says how (missing, size, header, digest)."""

    status = 503
    type = "model_corrupted"
    code = "model_corrupted"

    def __init__(self, path, reason, bad_chunks=None):
        self.path = path
        self.reason = reason
        # Chunk indices known to differ (from a chunk table); None when nothing says where.
        self.bad_chunks = bad_chunks
        super().__init__("%s: %s" % (os.path.basename(path), reason))


def sha256_file(path, chunk=CHUNK):
    """Hex sha256 of a file, read in fixed chunks into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def check_present(path, size, gguf=False):
    """The blob's stat; BlobCorrupted if it is missing, not `size` long, or not a GGUF file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BlobCorrupted(path, "missing") from None
    if st.st_size != size:
        raise BlobCorrupted(path, "size %d, manifest says %d" % (st.st_size, size))
    if gguf:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise BlobCorrupted(path, "not a GGUF file (bad header)")
    return st


def check_digest(path, digest, actual_hex):
    if "sha256:" + actual_hex != digest:
        raise BlobCorrupted(path, "sha256 mismatch: expected %s, got sha256:%s" % (digest, actual_hex))
