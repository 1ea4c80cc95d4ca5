"""Pull and repair: fetch what a manifest names and the store lacks or holds corrupted."""

import hashlib
import logging

from repair.download import fetch_blob
from repair.progress import progress_for
from repair.retry import call_with_retries
from repair.store import blob_layers, model_layer, parse_manifest
from repair.verify import BlobCorrupted

log = logging.getLogger("llmnode.pull")


def pull(client, store, guard, ref, *, terminal=None, **fetch_options):
    """Download a model into the store; blobs already present and intact are kept."""
    raw = call_with_retries(lambda: client.get_manifest(ref))
    manifest = parse_manifest(raw)
    fetched = fetch_broken(client, store, guard, ref, manifest, terminal=terminal, **fetch_options)
    store.write_manifest(ref, raw)
    guard.records.record_manifest(ref, hashlib.sha256(raw).hexdigest())
    log.info("pulled %s (%d of %d blobs downloaded)", ref, len(fetched), len(blob_layers(manifest)))
    return manifest


def fetch_broken(client, store, guard, ref, manifest, *, terminal=None, **fetch_options):
    """Fully check every blob of a manifest and download those missing or corrupted."""
    weights = model_layer(manifest)
    fetched = []
    for layer in blob_layers(manifest):
        try:
            guard.verify(layer, gguf=layer is weights)
            continue
        except BlobCorrupted as e:
            if e.reason != "missing":
                log.warning("%s: blob %s is corrupted: %s", ref, layer["digest"], e.reason)
        kind = layer.get("mediaType", "blob").rsplit(".", 1)[-1]
        label = str(ref) if layer is weights else "%s (%s)" % (ref, kind)
        with progress_for(label, layer["size"], terminal) as bar:
            state = fetch_blob(client, store, ref, layer, progress=bar, **fetch_options)
        guard.record_installed(layer, state.chunk_digests)
        fetched.append(layer)
    return fetched
