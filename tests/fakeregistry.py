"""An in-process OCI registry on loopback: manifests and blobs, Range, redirects, Bearer tokens."""

import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_TYPE = "application/vnd.ollama.image.model"
TOKEN = "test-token"


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_manifest(layers):
    """A manifest over (media type, bytes) layers, Ollama style; returns (raw manifest, blobs)."""
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    blobs = {digest_of(config): config}
    entries = []
    for media_type, data in layers:
        blobs[digest_of(data)] = data
        entries.append({"mediaType": media_type, "digest": digest_of(data), "size": len(data)})
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest_of(config), "size": len(config)},
        "layers": entries,
    }
    return json.dumps(manifest).encode(), blobs


class FakeRegistry:
    """Serve models; count what is served; optionally redirect, demand a token, or tamper."""

    def __init__(self):
        self.manifests = {}
        # Every manifest ever added, by digest: a registry keeps old versions when a tag moves.
        self.manifests_by_digest = {}
        self.blobs = {}
        # Guards the counters below; handler threads update them.
        self.lock = threading.Lock()
        self.bytes_served = Counter()
        self.requests = []
        self.redirect_blobs_to = None
        self.require_token = False
        self.tamper = None
        self.ignore_range = False
        self.content_range_offset = 0
        # When set, blob bodies stop half-way until the test sets this event.
        self.gate = None
        # When set, each blob body is sent at about this many bytes a second (a slow link).
        self.rate = None
        # Faults for the next blob requests, one each, in order; `always` applies to every one.
        self.faults = []
        self.always = None
        # Set at teardown so stalled handlers end.
        self.stalled = threading.Event()
        self.server = None

    def add_model(self, repository, tag, gguf_bytes, extra_layers=()):
        raw, blobs = make_manifest([(MODEL_TYPE, gguf_bytes)] + list(extra_layers))
        self.manifests[(repository, tag)] = raw
        self.manifests_by_digest[(repository, digest_of(raw))] = raw
        self.blobs.update(blobs)
        return json.loads(raw)

    def start(self):
        registry = self

        class Handler(_Handler):
            owner = registry

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def host(self):
        return "127.0.0.1:%d" % self.server.server_address[1]

    @property
    def url(self):
        return "http://" + self.host

    def stop(self):
        self.stalled.set()
        self.server.shutdown()
        self.server.server_close()

    def record(self, handler):
        with self.lock:
            self.requests.append((handler.path, dict(handler.headers)))

    def served(self, digest, n):
        with self.lock:
            self.bytes_served[digest] += n


class _Handler(BaseHTTPRequestHandler):
    owner = None

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        """What a pull-through cache asks first: the manifest's digest, or a blob's size."""
        reg = self.owner
        reg.record(self)
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", self.path)
        raw = None
        if m and m.group(2) == "manifests":
            raw = reg.manifests.get((m.group(1), m.group(3))) or \
                reg.manifests_by_digest.get((m.group(1), m.group(3)))
        elif m:
            raw = reg.blobs.get(m.group(3))
        self.send_response(200 if raw is not None else 404)
        if raw is not None:
            self.send_header("Docker-Content-Digest", digest_of(raw))
            self.send_header("Content-Type", MANIFEST_TYPE if m.group(2) == "manifests"
                             else "application/octet-stream")
        self.send_header("Content-Length", str(len(raw or b"")))
        self.end_headers()

    def do_GET(self):
        reg = self.owner
        reg.record(self)
        if self.path == "/v2/":
            return self.send_json(200, {})
        if self.path.startswith("/token"):
            return self.send_json(200, {"token": TOKEN})
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", self.path)
        if not m:
            return self.send_json(404, {"errors": [{"code": "NAME_UNKNOWN"}]})
        repository, kind, ref = m.groups()
        if reg.require_token and self.headers.get("Authorization") != "Bearer " + TOKEN:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="%s/token",service="fake",'
                             'scope="repository:%s:pull"' % (reg.url, repository))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "manifests":
            raw = reg.manifests.get((repository, ref))
            if raw is None:
                raw = reg.manifests_by_digest.get((repository, ref))
            if raw is None:
                return self.send_json(404, {"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            return self.send_bytes(200, raw, MANIFEST_TYPE)
        fault = reg.always or (reg.faults.pop(0) if reg.faults else None)
        if fault and fault[0] == "status":
            self.send_response(fault[1])
            for k, v in (fault[2] if len(fault) > 2 else {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault and fault[0] == "redirect_loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if reg.redirect_blobs_to:
            self.send_response(307)
            self.send_header("Location", reg.redirect_blobs_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = reg.blobs.get(ref)
        if data is None:
            return self.send_json(404, {"errors": [{"code": "BLOB_UNKNOWN"}]})
        if reg.tamper:
            data = reg.tamper(data)
        if fault and fault[0] == "alter":
            at = fault[1]
            data = data[:at] + bytes(b ^ 0x55 for b in data[at:at + 64]) + data[at + 64:]
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        ignore_range = reg.ignore_range or (fault and fault[0] == "ignore_range")
        if rng and not ignore_range:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(data) - 1
            shift = 10 if fault and fault[0] == "bad_range" else reg.content_range_offset
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start + shift, end, len(data)))
        else:
            start, end = 0, len(data) - 1
            self.send_response(200)
        body = data[start:end + 1]
        if fault and fault[0] == "alter_body":
            at = fault[1]
            body = body[:at] + bytes(b ^ 0x55 for b in body[at:at + 64]) + body[at + 64:]
        if fault and fault[0] in ("reset", "short", "stall"):
            return self.break_off(fault, body, ref)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if reg.gate is not None:
            half = len(body) // 2
            self.wfile.write(body[:half])
            self.wfile.flush()
            reg.served(ref, half)
            if not reg.gate.wait(timeout=120):
                return
            body = body[half:]
        try:
            if reg.rate:
                piece = max(1, reg.rate // 50)
                for i in range(0, len(body), piece):
                    self.wfile.write(body[i:i + piece])
                    self.wfile.flush()
                    reg.served(ref, len(body[i:i + piece]))
                    time.sleep(len(body[i:i + piece]) / reg.rate)
                return
            self.wfile.write(body)
        except OSError:
            return
        reg.served(ref, len(body))

    def break_off(self, fault, body, ref):
        """Send part of the body, then reset the connection, end it early, or go silent."""
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = min(fault[1], len(body))
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.owner.served(ref, cut)
        if fault[0] == "stall":
            self.owner.stalled.wait(fault[2])
        elif fault[0] == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def send_json(self, status, obj):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def send_bytes(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if content_type == MANIFEST_TYPE:
            self.send_header("Docker-Content-Digest", digest_of(body))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
