"""Debian's docker-registry (the CNCF distribution registry) on loopback, and pushing to it."""

import json
import shutil
import socket
import subprocess
import time

import requests

from tests.fakeregistry import MANIFEST_TYPE, make_manifest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Distribution:
    """`docker-registry serve` on a free loopback port, storing under `root`."""

    def __init__(self, root, proxy_url=None):
        """With `proxy_url` it is a pull-through cache of that registry (`proxy.remoteurl`)."""
        binary = shutil.which("docker-registry")
        assert binary, "docker-registry is not installed (apt-get install -y docker-registry)"
        port = free_port()
        config = root / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            "    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%d\n" % (root / "data", port)
            + ("proxy:\n  remoteurl: %s\n" % proxy_url if proxy_url else ""))
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url = "http://127.0.0.1:%d" % port
        self.host = "127.0.0.1:%d" % port
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.url + "/v2/", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "docker-registry did not start"
            assert self.proc.poll() is None, "docker-registry exited"
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def push_blob(self, repository, digest, data):
        """Upload one blob (bytes, or an open file streamed as is)."""
        r = requests.post("%s/v2/%s/blobs/uploads/" % (self.url, repository), timeout=10)
        assert r.status_code == 202, r.text
        location = requests.compat.urljoin(self.url, r.headers["Location"])
        sep = "&" if "?" in location else "?"
        r = requests.put(location + sep + "digest=" + digest, data=data, timeout=600,
                         headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text

    def push_manifest(self, repository, tag, raw):
        r = requests.put("%s/v2/%s/manifests/%s" % (self.url, repository, tag), data=raw,
                         timeout=10, headers={"Content-Type": MANIFEST_TYPE})
        assert r.status_code == 201, r.text

    def push(self, repository, tag, layers):
        """Push blobs then the manifest of (media type, bytes) layers; return the manifest."""
        raw, blobs = make_manifest(layers)
        for digest, data in blobs.items():
            self.push_blob(repository, digest, data)
        self.push_manifest(repository, tag, raw)
        return json.loads(raw)
