"""`llmnode.py demo`: the auto-repair story offline, on a tiny model and a throwaway registry."""

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger("llmnode.demo")

MODEL = "tiny:demo"
MODEL_TYPE = "application/vnd.ollama.image.model"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# GGUF value types used below.
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9


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


def tiny_gguf(seed=0, n_embd=64, n_ff=128, n_head=4, n_layer=2, chat_template=CHAT_TEMPLATE):
    """A llama-architecture GGUF with a byte vocabulary and random weights (about 460 KB)."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    n_vocab = len(tokens)
    kvs = [
        _kv("general.architecture", _STR, "llama"),
        _kv("llama.context_length", _U32, 512),
        _kv("llama.embedding_length", _U32, n_embd),
        _kv("llama.block_count", _U32, n_layer),
        _kv("llama.feed_forward_length", _U32, n_ff),
        _kv("llama.attention.head_count", _U32, n_head),
        _kv("llama.attention.head_count_kv", _U32, n_head),
        _kv("llama.rope.dimension_count", _U32, n_embd // n_head),
        _kv("llama.attention.layer_norm_rms_epsilon", _F32, 1e-5),
        _kv("tokenizer.ggml.model", _STR, "llama"),
        _kv("tokenizer.ggml.tokens", _ARR, (_STR, tokens)),
        _kv("tokenizer.ggml.scores", _ARR, (_F32, [0.0] * n_vocab)),
        _kv("tokenizer.ggml.token_type", _ARR, (_I32, [2, 3, 3] + [6] * 256)),
        _kv("tokenizer.ggml.bos_token_id", _U32, 1),
        _kv("tokenizer.ggml.eos_token_id", _U32, 2),
        _kv("tokenizer.ggml.unknown_token_id", _U32, 0),
        _kv("tokenizer.ggml.add_bos_token", _BOOL, True),
        _kv("llama.vocab_size", _U32, n_vocab),
        _kv("tokenizer.chat_template", _STR, chat_template),
    ]

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
    tensors += [("output_norm.weight", ones), ("output.weight", w(n_vocab, n_embd))]

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


class _Registry(BaseHTTPRequestHandler):
    """Serves one model's manifest and blobs, as /v2/library/tiny/..."""

    files = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = self.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.send_header("Content-Type", MANIFEST_TYPE if "/manifests/" in self.path
                         else "application/octet-stream")
        self.end_headers()
        self.wfile.write(data or b"")


def _serve_registry(weights):
    def entry(media_type, data):
        return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "size": len(data)}

    config = b'{"model_format":"gguf","model_family":"llama"}'
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": entry("application/vnd.docker.container.image.v1+json", config),
                "layers": [entry(MODEL_TYPE, weights)]}
    files = {"/v2/library/tiny/manifests/demo": json.dumps(manifest).encode()}
    for layer, data in ((manifest["config"], config), (manifest["layers"][0], weights)):
        files["/v2/library/tiny/blobs/" + layer["digest"]] = data
    handler = type("Handler", (_Registry,), {"files": files})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_demo(settings, start, out=print):
    """Pull, serve, corrupt, ask again: the repair happens inside the request. `start(settings)`
    serves a node (llmnode's, passed in: this package never imports the surface) and returns
    (node, base url, stop)."""
    from repair import names

    workdir = tempfile.mkdtemp(prefix="llmnode-demo-")
    registry = _serve_registry(tiny_gguf())
    server = None
    try:
        registry_url = "http://127.0.0.1:%d" % registry.server_address[1]
        values = dict(vars(settings), models_dir=os.path.join(workdir, "models"),
                      registry_url=registry_url, n_ctx=512, threads=8)
        node, base, server = start(type(settings)(values))
        out("== llmnode demo: store %s, registry %s" % (values["models_dir"], registry_url))
        node.repairs.pull(names.parse(MODEL))
        url = base + "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "test"}], "max_tokens": 16}

        out("== 1. a normal request")
        _ask(url, body, out)
        layer = node.store.read_manifest(names.parse(MODEL))["layers"][0]
        blob = node.store.blob_path(layer["digest"])
        out("== 2. corrupt the model: echo \"corrupted\" > %s" % blob)
        with open(blob, "w") as f:
            f.write("corrupted\n")
        out("== 3. the same request: the node detects the damage, downloads the blob again, answers")
        _ask(url, body, out)
        ok = "sha256:" + hashlib.sha256(open(blob, "rb").read()).hexdigest() == layer["digest"]
        out("== the blob matches its digest again: %s" % ok)
        return 0 if ok else 1
    finally:
        if server is not None:
            server()
        registry.shutdown()
        registry.server_close()
        shutil.rmtree(workdir, ignore_errors=True)
        out("== cleaned up %s" % workdir)


def _ask(url, body, out):
    import requests

    started = time.monotonic()
    r = requests.post(url, json=body, timeout=600)
    out("   HTTP %d in %.2fs: %s" % (r.status_code, time.monotonic() - started, r.text[:300]))
    r.raise_for_status()
