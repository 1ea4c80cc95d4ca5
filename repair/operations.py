"""Store operations: pull, delete and copy, the changes to which blobs a model names, each one
step to every other writer on the store (made inside the records' cross-process lock)."""

import hashlib
import logging

from repair.errors import ManifestInvalid, ModelNotFound
from repair.locks import FileLock
from repair.progress import PullEvent
from repair.records import claimed_by_pulls
from repair.retry import call_with_retries
from repair.store import layers_to_check, named_in, parse_manifest, pid_alive

log = logging.getLogger("llmnode.repair")


def pull(repairs, ref, report=None):
    """Fetch a model's manifest by its tag and every blob the store lacks or holds corrupted
    (through the coordinator `repairs`, so a pull and a repair of one blob are one flight),
    then install the manifest and pin it; (manifest, digests fetched, the pin it replaced if
    the tag moved). `report(PullEvent)` hears each step. The blobs are claimed in the records
    before the first is checked, so a delete of another model that shares one keeps it until
    this pull's manifest names it."""
    report = report or (lambda event: None)
    records, store = repairs.records, repairs.store
    report(PullEvent("manifest"))
    raw = call_with_retries(lambda: repairs.client.get_manifest(ref), repairs.retry)
    manifest = parse_manifest(raw)
    layers = layers_to_check(manifest)
    claim = records.begin_pull([layer["digest"] for layer, _ in layers])
    try:
        fetched = []
        for layer, gguf in layers:
            report(PullEvent("blob", layer["digest"], layer["size"], 0))
            if repairs.check_layer(ref, layer, gguf=gguf, pulling=True):
                fetched.append(layer["digest"])
            report(PullEvent("blob", layer["digest"], layer["size"], layer["size"]))
        report(PullEvent("verify"))
        new = hashlib.sha256(raw).hexdigest()
        report(PullEvent("write"))
        with records.changing() as data:
            old = data["manifests"].get(str(ref))
            store.write_manifest(ref, raw)
            data["manifests"][str(ref)] = new
            data["pulls"].pop(claim, None)
    except BaseException:
        records.end_pull(claim)
        raise
    repairs.forget(ref)
    moved = old if old is not None and old != new else None
    if moved:
        log.info("model %s: the tag moved from sha256:%s to sha256:%s; now pinned to the new "
                 "manifest", ref, old, new)
    log.info("pulled %s (%d of %d blobs downloaded)", ref, len(fetched), len(layers))
    report(PullEvent("done"))
    return manifest, fetched, moved


def delete(repairs, ref):
    """Remove a model: its manifest and pin, and the blobs no other manifest names and no
    pull has claimed, with their chunk tables and records; the digests removed.

    It takes the lock of each of the model's blobs first, so it waits for a repair that is
    installing one of them (the repair's result is then removed with the rest); a repair
    that starts after it finds its blob named by no model and installs nothing."""
    store = repairs.store
    raw = store.read_manifest_raw(ref)
    digests = sorted(named_in(raw))
    deadline = repairs.clock() + repairs.timeout_secs
    store.ensure_dirs()
    held = []
    try:
        for digest in digests:
            held.append(FileLock(store.lock_path(digest), clock=repairs.clock).acquire(
                deadline, on_wait=lambda d=digest: log.info(
                    "delete of model %s waits for blob %s being installed", ref, d)))
        with repairs.records.changing() as data:
            store.remove_manifest(ref)
            data["manifests"].pop(str(ref), None)
            data["pulls"] = {k: p for k, p in data["pulls"].items() if pid_alive(p["pid"])}
            used = store.named_digests() | claimed_by_pulls(data)
            removed = [d for d in digests if d not in used]
            for digest in removed:
                store.remove_blob(digest)
                repairs.guard.tables.remove(digest)
                data["blobs"].pop(digest, None)
                data["tables"].pop(digest, None)
    except FileNotFoundError:
        raise ModelNotFound(str(ref)) from None  # another delete removed it first
    finally:
        for lock in held:
            lock.release()
    repairs.forget(ref, removed)
    log.info("deleted model %s (%d blob(s) no other model uses removed)", ref, len(removed))
    return removed


def copy(repairs, source, destination):
    """Name the source's manifest (checked against its pin, repaired if need be) under
    `destination` too, pinned alike; one step to a delete of the source."""
    repairs.manifest(source)
    with repairs.records.changing() as data:
        raw = repairs.store.read_manifest_raw(source)
        pin = hashlib.sha256(raw).hexdigest()
        if data["manifests"].get(str(source)) not in (None, pin):
            raise ManifestInvalid("manifest of %s changed since it was pulled" % source)
        repairs.store.write_manifest(destination, raw)
        data["manifests"][str(destination)] = pin
    repairs.forget(destination)
    log.info("copied model %s to %s", source, destination)
