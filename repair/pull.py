"""Pull: fetch a model's manifest and every blob it names, then install the manifest last."""

import logging

from repair.download import fetch_blob
from repair.progress import progress_for
from repair.retry import call_with_retries
from repair.store import blob_layers, model_layer, parse_manifest
from repair.verify import BlobCorrupted, check_blob

log = logging.getLogger("llmnode.pull")


def pull(client, store, ref, *, terminal=None, **fetch_options):
    """Download a model into the store; blobs already present and intact are kept."""
    raw = call_with_retries(lambda: client.get_manifest(ref))
    manifest = parse_manifest(raw)
    weights = model_layer(manifest)
    fetched = 0
    for layer in blob_layers(manifest):
        path = store.blob_path(layer["digest"])
        try:
            check_blob(path, layer["digest"], layer["size"])
            continue
        except BlobCorrupted:
            pass
        label = str(ref) if layer is weights else "%s %s" % (ref, layer.get("mediaType", "blob"))
        with progress_for(label, layer["size"], terminal) as bar:
            state = fetch_blob(client, store, ref, layer, progress=bar, **fetch_options)
        fetched += state.received
    store.write_manifest(ref, raw)
    log.info("pulled %s (%d bytes downloaded)", ref, fetched)
    return manifest
