"""The Ollama-layout store: manifests by name, blobs by digest, written atomically.

Several writers share one store: the serving node, `pull` / `repair` / `verify` run beside it, a
second node, Ollama. A blob's writer holds an flock on `.llmnode/partial/sha256-<hex>.lock` for its
whole write and install (the kernel drops it if the writer dies; others wait, within the repair's
deadline, and then find the blob installed). The records (`.llmnode/verified.json`) change under
an flock on `.llmnode/verified.lock` (`repair.records`; an unreadable file is moved aside and
logged). Temporaries `<name>.tmp-<pid>-<random>` are removed at start only for dead processes;
Ollama's own `-partial` files are never touched; a delete never removes a blob another model or a
running pull needs (`repair.operations`).
"""

import json
import os
import re
import tempfile

from repair import names
from repair.errors import LLMNodeError, ManifestInvalid, ModelNotFound

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_DIGEST_TEXT = re.compile(r"sha256:[0-9a-f]{64}")
# The layers read whole as text (Ollama's), and the most of one that is read.
TEXT_LAYERS = ("template", "system", "params", "license")
TEXT_LAYER_MAX = 1 << 20


def digest_hex(digest):
    """Return the hex of a `sha256:<64 hex>` digest; refuse anything else."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if not m:
        raise ManifestInvalid("Invalid blob digest %r" % (digest,))
    return m.group(1)


def parse_manifest(raw):
    """Check raw manifest bytes and return the manifest dict."""
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestInvalid("Manifest is not valid JSON: %s" % e) from e
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ManifestInvalid("Manifest has no layers")
    for layer in blob_layers(manifest):
        if not isinstance(layer, dict) or not isinstance(layer.get("size"), int) or layer["size"] < 0:
            raise ManifestInvalid("Manifest layer without a valid size: %r" % (layer,))
        digest_hex(layer.get("digest"))
    model_layer(manifest)
    return manifest


def model_layer(manifest):
    """The layer holding the GGUF weights."""
    for layer in manifest["layers"]:
        if layer.get("mediaType") == MODEL_MEDIA_TYPE:
            return layer
    raise ManifestInvalid("Manifest has no %s layer" % MODEL_MEDIA_TYPE)


def blob_layers(manifest):
    """Every blob a manifest refers to: config first, then the layers."""
    config = manifest.get("config")
    return ([config] if config else []) + list(manifest["layers"])


def layers_to_check(manifest):
    """(layer, is_the_gguf_weights) for every blob of a manifest: the one list that pull,
    repair, verify and scrub walk."""
    weights = model_layer(manifest)
    return [(layer, layer is weights) for layer in blob_layers(manifest)]


def named_in(raw):
    """Every digest a manifest's bytes name, parsed or not."""
    return set(_DIGEST_TEXT.findall(raw.decode("utf-8", "replace")))


def layer_kind(layer):
    """`model`, `template`, `params`, ... from Ollama's media type."""
    return layer.get("mediaType", "").rsplit(".", 1)[-1]


def text_layers(manifest):
    """The (kind, layer) of each of a manifest's layers that an answer reads as text."""
    return [(layer_kind(layer), layer) for layer in manifest["layers"]
            if layer_kind(layer) in TEXT_LAYERS and layer.get("size", 0) <= TEXT_LAYER_MAX]


def stat_stamp(path):
    """(inode, size, mtime, ctime) of a file, None if it cannot be stat'ed: any write to it
    (even one that puts its times back) moves its ctime, so an equal stamp means unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Store:
    """An Ollama-layout models directory."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.manifests_dir = os.path.join(self.root, "manifests")
        self.blobs_dir = os.path.join(self.root, "blobs")
        self.partials_dir = os.path.join(self.root, ".llmnode", "partial")

    def manifest_path(self, ref):
        return os.path.join(self.manifests_dir, *ref.path_parts)

    def blob_path(self, digest):
        return os.path.join(self.blobs_dir, "sha256-" + digest_hex(digest))

    def partial_path(self, digest):
        """Where this node writes a blob before it is verified: under `.llmnode/`, not beside
        the blobs, so Ollama's own `-partial` files (preallocated to full size) are never
        taken for ours, and Ollama's prune never deletes ours."""
        return os.path.join(self.partials_dir, "sha256-%s-partial" % digest_hex(digest))

    def lock_path(self, digest):
        """The lock file a writer of this blob holds (flock) for its whole write and install."""
        return os.path.join(self.partials_dir, "sha256-%s.lock" % digest_hex(digest))

    def read_manifest_raw(self, ref):
        """The manifest bytes of a model; ModelNotFound if there are none."""
        try:
            with open(self.manifest_path(ref), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(str(ref)) from None

    def read_manifest(self, ref):
        """The parsed manifest of a model; ModelNotFound if there is none."""
        return parse_manifest(self.read_manifest_raw(ref))

    def remove_manifest(self, ref):
        os.unlink(self.manifest_path(ref))
        fsync_dir(os.path.dirname(self.manifest_path(ref)))

    def remove_blob(self, digest):
        try:
            os.unlink(self.blob_path(digest))
        except FileNotFoundError:
            pass

    def named_digests(self):
        """Every digest the store's manifests name: in their bytes, parsed or not, so a blob
        a damaged manifest still needs is never taken from it."""
        used = set()
        for ref in self.models():
            try:
                used |= named_in(self.read_manifest_raw(ref))
            except LLMNodeError:
                continue
        return used

    def write_manifest(self, ref, raw):
        """Install manifest bytes atomically under the model's name."""
        parse_manifest(raw)
        path = self.manifest_path(ref)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, raw)

    def models(self):
        """The ref of every manifest in the store whose path is a valid name."""
        found = []
        if not os.path.isdir(self.manifests_dir):
            return found
        for dirpath, _dirs, files in os.walk(self.manifests_dir):
            rel = os.path.relpath(dirpath, self.manifests_dir).split(os.sep)
            if len(rel) != 3:
                continue
            for tag in files:
                try:
                    ref = names.parse("%s/%s/%s:%s" % (rel[0], rel[1], rel[2], tag))
                except LLMNodeError:
                    continue
                if ref.path_parts == (rel[0], rel[1], rel[2], tag):
                    found.append(ref)
        return sorted(found, key=str)

    def remove_temporaries(self):
        """Delete what an interrupted atomic write left (`*.tmp-PID-XXXX`) by a process that no
        longer runs; a live writer's temporaries (another node, a command) and partial blobs stay."""
        removed = []
        for d, _, files in os.walk(self.root):
            for f in files:
                m = _TEMPORARY.search(f)
                if m and not pid_alive(int(m.group(1))):
                    try:
                        os.unlink(os.path.join(d, f))
                    except FileNotFoundError:
                        continue
                    removed.append(os.path.join(d, f))
        return removed

    def ensure_dirs(self):
        os.makedirs(self.blobs_dir, exist_ok=True)
        os.makedirs(self.manifests_dir, exist_ok=True)
        os.makedirs(self.partials_dir, exist_ok=True)


_TEMPORARY = re.compile(r"\.tmp-(\d+)(-\w+)?$")


def pid_alive(pid):
    """Whether a process runs under `pid` (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomically(path, data):
    """Write bytes to a temporary sibling of a name no other writer (thread or process) can
    pick, fsync, and rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                               prefix="%s.tmp-%d-" % (os.path.basename(path), os.getpid()))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(os.path.dirname(path))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
