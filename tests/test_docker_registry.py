"""One pull from the real CNCF distribution registry (Debian's docker-registry) on loopback."""

import hashlib
import json
import os

import pytest

from repair import names
from repair.chunks import hash_file
from repair.download import fetch_blob
from repair.hashing import sha256_file
from repair.registry import RegistryClient
from repair.store import Store
from tests.conftest import node_env, run_cli
from tests.distribution import Distribution
from tests.fakeregistry import MODEL_TYPE


@pytest.fixture
def distribution(tmp_path):
    registry = Distribution(tmp_path)
    yield registry
    registry.stop()


def test_pull_from_a_real_distribution_registry(distribution, tiny_gguf, models_dir):
    template = ("application/vnd.ollama.image.template", b"{{ .Prompt }}")
    manifest = distribution.push("library/tiny", "latest", [(MODEL_TYPE, tiny_gguf), template])
    host = distribution.host
    result = run_cli("pull", host + "/library/tiny", env=node_env(models_dir, "https://unused.example"))
    assert result.returncode == 0, result.stderr
    stored = os.path.join(models_dir, "manifests", host, "library", "tiny", "latest")
    assert json.load(open(stored)) == manifest
    for layer in [manifest["config"]] + manifest["layers"]:
        path = os.path.join(models_dir, "blobs", layer["digest"].replace(":", "-"))
        assert "sha256:" + sha256_file(path) == layer["digest"]
    weights = os.path.join(models_dir, "blobs", "sha256-" + hashlib.sha256(tiny_gguf).hexdigest())
    assert open(weights, "rb").read() == tiny_gguf
    assert not [f for f in os.listdir(Store(models_dir).partials_dir) if f.endswith("-partial")]


def test_parallel_ranged_download_from_a_real_distribution_registry(distribution, tmp_path, caplog):
    caplog.set_level("INFO")
    data = os.urandom(12 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    distribution.push_blob("library/big", digest, data)
    store = Store(str(tmp_path / "models"))
    layer = {"mediaType": MODEL_TYPE, "digest": digest, "size": len(data)}
    state = fetch_blob(RegistryClient("https://unused.example"), store,
                       names.parse("%s/library/big:1" % distribution.host), layer,
                       connections=4, part_min=1 << 20)
    assert open(store.blob_path(digest), "rb").read() == data
    # Each byte came once: the registry honoured every part's Range with its end.
    assert state.received == len(data) and state.attempts == 1
    assert "ignored a Range" not in caplog.text  # no fallback to one connection
    assert state.chunk_digests == hash_file(store.blob_path(digest))[1]
