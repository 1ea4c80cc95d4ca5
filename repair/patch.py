"""Range repair: fetch again only the chunks a chunk table says are damaged, patch them in, and
let the blob count as good only once its whole-file digest matches."""

import hashlib
import logging
import os
import time

import requests

from repair.chunks import chunk_range
from repair.errors import DigestMismatch, NetworkError, RegistryHTTPError, RepairTimeout
from repair.registry import check_content_range
from repair.retry import call_with_retries
from repair.store import fsync_dir
from repair.verify import sha256_file

log = logging.getLogger("llmnode.patch")



def patch_blob(client, store, ref, layer, table, bad, state, deadline=None, clock=None, retry=None,
               sleep=time.sleep):
    """Replace the damaged chunks `bad` of a blob with the registry's bytes, in place; the
    blob's chunk table stays valid."""
    digest, size = layer["digest"], layer["size"]
    final, work = store.blob_path(digest), store.partial_path(digest)
    # From here until the whole digest matches, nothing sits under the digest's name.
    os.replace(final, work)
    try:
        with open(work, "r+b") as f:
            for index in bad:
                offset, length = chunk_range(index, size)
                data = call_with_retries(
                    lambda o=offset, n=length: _fetch_range(client, ref, digest, o, n), retry, sleep)
                if hashlib.sha256(data).digest() != table[index]:
                    raise DigestMismatch("%s chunk %d" % (digest, index), hashlib.sha256(data).hexdigest())
                os.pwrite(f.fileno(), data, offset)
                state.received += length
                state.done += length
                if deadline is not None and clock() > deadline:
                    raise RepairTimeout()
            os.fsync(f.fileno())
        # Each patched chunk already matched the table, so only the whole digest is left to check.
        whole = sha256_file(work)
        if "sha256:" + whole != digest:
            raise DigestMismatch(digest, whole)
    except BaseException:
        # Back where it was (no better, no worse: only verified chunks were written).
        os.replace(work, final)
        raise
    os.replace(work, final)
    fsync_dir(store.blobs_dir)


def _fetch_range(client, ref, digest, offset, length):
    end = offset + length - 1
    resp = client.open_blob(ref, digest, start=offset, end=end)
    with resp:
        if resp.status_code != 206:
            raise RegistryHTTPError(resp.status_code, resp.url)
        check_content_range(resp, offset, end)
        data = bytearray()
        try:
            for piece in resp.iter_content(1 << 20):
                data += piece
                if len(data) > length:
                    break
        except requests.RequestException as e:
            raise NetworkError("reading bytes %d-%d of %s: %s" % (offset, end, digest, e)) from e
    if len(data) != length:
        raise NetworkError("got %d bytes for bytes %d-%d" % (len(data), offset, end))
    return bytes(data)
