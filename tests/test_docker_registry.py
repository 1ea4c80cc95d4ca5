"""One pull from the real CNCF distribution registry (Debian's docker-registry) on loopback."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import requests

from repair.verify import sha256_file
from tests.conftest import node_env, run_cli
from tests.fakeregistry import MANIFEST_TYPE, MODEL_TYPE, make_manifest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def distribution(tmp_path):
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed (apt-get install -y docker-registry)"
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        "    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%d\n" % (tmp_path / "data", port))
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % port
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(url + "/v2/", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "docker-registry did not start"
        assert proc.poll() is None, "docker-registry exited"
        time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def push(url, repository, tag, layers):
    """Push blobs then the manifest through the registry's HTTP API."""
    raw, blobs = make_manifest(layers)
    for digest, data in blobs.items():
        r = requests.post("%s/v2/%s/blobs/uploads/" % (url, repository), timeout=10)
        assert r.status_code == 202, r.text
        location = requests.compat.urljoin(url, r.headers["Location"])
        sep = "&" if "?" in location else "?"
        r = requests.put(location + sep + "digest=" + digest, data=data, timeout=30,
                         headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
    r = requests.put("%s/v2/%s/manifests/%s" % (url, repository, tag), data=raw, timeout=10,
                     headers={"Content-Type": MANIFEST_TYPE})
    assert r.status_code == 201, r.text
    return json.loads(raw)


def test_pull_from_a_real_distribution_registry(distribution, tiny_gguf, models_dir):
    template = ("application/vnd.ollama.image.template", b"{{ .Prompt }}")
    manifest = push(distribution, "library/tiny", "latest", [(MODEL_TYPE, tiny_gguf), template])
    host = distribution[len("http://"):]
    result = run_cli("pull", host + "/library/tiny", env=node_env(models_dir, "https://unused.example"))
    assert result.returncode == 0, result.stderr
    stored = os.path.join(models_dir, "manifests", host, "library", "tiny", "latest")
    assert json.load(open(stored)) == manifest
    for layer in [manifest["config"]] + manifest["layers"]:
        path = os.path.join(models_dir, "blobs", layer["digest"].replace(":", "-"))
        assert "sha256:" + sha256_file(path) == layer["digest"]
    weights = os.path.join(models_dir, "blobs", "sha256-" + hashlib.sha256(tiny_gguf).hexdigest())
    assert open(weights, "rb").read() == tiny_gguf
    assert not [f for f in os.listdir(os.path.join(models_dir, "blobs")) if f.endswith("-partial")]
