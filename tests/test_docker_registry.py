"""One pull from the real CNCF distribution registry (Debian's docker-registry) on loopback."""

import hashlib
import json
import os

import pytest

from repair.verify import sha256_file
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
    assert not [f for f in os.listdir(os.path.join(models_dir, "blobs")) if f.endswith("-partial")]
