"""The store on disk: Ollama's manifests read as they are, a missing or unusable manifest, atomic
manifest writes, listing only valid names, leftovers of interrupted writes, and paths that come
only from validated names and digests."""

import json
import os

import pytest

from repair import names
from repair.errors import ModelNotFound
from repair.store import ManifestInvalid, Store, model_layer, parse_manifest
from tests.fakeregistry import MODEL_TYPE, make_manifest

OLLAMA_LAYERS = [
    (MODEL_TYPE, b"GGUF weights"),
    ("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
    ("application/vnd.ollama.image.params", b'{"stop": ["<|end|>"]}'),
    ("application/vnd.ollama.image.system", b"You are helpful."),
    ("application/vnd.ollama.image.license", b"MIT"),
]


def test_an_ollama_written_manifest_is_read_as_is(tmp_path):
    raw, _ = make_manifest(OLLAMA_LAYERS)
    path = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "gpt-oss" / "7b"
    path.parent.mkdir(parents=True)
    path.write_bytes(raw)
    store = Store(str(tmp_path))
    ref = names.parse("gpt-oss:7b")
    layer = model_layer(store.read_manifest(ref))
    assert layer["size"] == len(b"GGUF weights")
    assert store.blob_path(layer["digest"]) == os.path.join(
        str(tmp_path), "blobs", "sha256-" + layer["digest"][7:])
    assert store.models() == [ref]


def test_a_model_without_manifest_is_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="pull"):
        Store(str(tmp_path)).read_manifest(names.parse("nothing:here"))


@pytest.mark.parametrize("raw", [
    b"not json", b"[]", b'{"layers": []}',
    b'{"layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:'
    + b"0" * 64 + b'", "size": 1}]}',
    b'{"layers": [{"mediaType": "application/vnd.ollama.image.model", '
    b'"digest": "sha256:../../x", "size": 1}]}',
    b'{"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:'
    + b"0" * 64 + b'", "size": -1}]}',
])
def test_unusable_manifests_are_refused(raw):
    with pytest.raises(ManifestInvalid):
        parse_manifest(raw)


def test_write_manifest_is_atomic_and_leaves_no_temporary(tmp_path):
    raw, _ = make_manifest(OLLAMA_LAYERS)
    store = Store(str(tmp_path))
    ref = names.parse("me/tiny:v1")
    store.write_manifest(ref, raw)
    assert json.loads(open(store.manifest_path(ref), "rb").read()) == json.loads(raw)
    assert os.listdir(os.path.dirname(store.manifest_path(ref))) == ["v1"]


def test_listing_skips_paths_that_are_not_valid_names(tmp_path):
    raw, _ = make_manifest(OLLAMA_LAYERS)
    store = Store(str(tmp_path))
    store.write_manifest(names.parse("good:1"), raw)
    bad = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "bad model" / "1"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(raw)
    assert [str(r) for r in store.models()] == ["good:1"]


def test_leftovers_of_interrupted_writes_are_removed_but_partials_stay(tmp_path):
    store = Store(str(tmp_path))
    store.ensure_dirs()
    leftover = os.path.join(store.manifests_dir, "7b.tmp-999999")
    partial = os.path.join(store.blobs_dir, "sha256-" + "a" * 64 + "-partial")
    for p in (leftover, partial):
        open(p, "wb").close()
    assert store.remove_temporaries() == [leftover]
    assert os.path.exists(partial) and not os.path.exists(leftover)


def test_store_paths_come_only_from_validated_names(models_dir):
    store = Store(models_dir)
    raw, _ = make_manifest([(MODEL_TYPE, b"GGUF")])
    store.write_manifest(names.parse("me/m:1"), raw)
    layer = model_layer(store.read_manifest(names.parse("me/m:1")))
    assert os.path.dirname(store.blob_path(layer["digest"])) == os.path.join(models_dir, "blobs")
