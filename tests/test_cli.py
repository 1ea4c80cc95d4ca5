"""The command line: what `python llmnode.py serve` says at start and when a setting is wrong;
`pull` (its progress, an unknown model, extra layers), `list`, and `verify` and `repair` finding
and fixing a corrupted blob."""

import json
import os

from repair import names
from repair.store import Store
from tests.conftest import MODEL, assert_no_blob_under_a_wrong_digest, blob_of, node_env, run_cli
from tests.fakeregistry import MODEL_TYPE


def store_lines(node):
    return [line.rstrip("\n") for line in node.lines if line.startswith("[INFO] store ")]


def test_serve_on_an_empty_store_names_it_and_the_command_that_pulls_a_model(models_dir, registry,
                                                                              start_node):
    node = start_node(node_env(models_dir, registry.url))
    assert store_lines(node) == ["[INFO] store %s holds no models; pull one with: "
                                 "python llmnode.py pull smollm2:135m" % models_dir]


def test_serve_names_the_store_and_how_many_models_it_holds(models_dir, registry, tiny_gguf, start_node):
    registry.add_model("library/other", "1", tiny_gguf)
    env = node_env(models_dir, registry.url)
    for name in ("gpt-oss:7b", "other:1"):
        assert run_cli("pull", name, env=env).returncode == 0
    node = start_node(env)
    assert store_lines(node) == ["[INFO] store %s holds 2 models" % models_dir]


def test_pull_logs_progress_and_list_shows_the_model(pulled, registry, models_dir, tmp_path):
    again = run_cli("pull", MODEL, env=node_env(str(tmp_path / "fresh"), registry.url))
    assert again.returncode == 0
    assert "[INFO] Downloading model: gpt-oss:7b (100%)" in again.stderr
    listing = run_cli("list", env=node_env(pulled, registry.url))
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert listing.stdout.splitlines()[1].startswith(MODEL)


def test_pull_of_an_unknown_model_fails_with_the_cause(registry, models_dir):
    result = run_cli("pull", "absent:1", env=node_env(models_dir, registry.url))
    assert result.returncode == 1
    assert "model not found in registry" in result.stderr


def test_an_invalid_setting_stops_the_node_naming_the_variable(models_dir, registry):
    result = run_cli("serve", env=node_env(models_dir, registry.url, LLM_REPAIR_TIMEOUT_SECS="soon"))
    assert result.returncode == 2
    assert "LLM_REPAIR_TIMEOUT_SECS" in result.stderr


def test_verify_finds_a_corrupted_blob_and_repair_fixes_it(pulled, registry):
    env = node_env(pulled, registry.url)
    assert run_cli("verify", env=env).returncode == 0
    manifest = json.load(open(os.path.join(pulled, "manifests", "registry.ollama.ai", "library",
                                           "gpt-oss", "7b")))
    digest = manifest["layers"][0]["digest"]
    blob = os.path.join(pulled, "blobs", digest.replace(":", "-"))
    st = os.stat(blob)
    with open(blob, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\0" * 64)
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = run_cli("verify", MODEL, env=env)
    assert bad.returncode == 1
    assert "%s  %s  CORRUPTED: sha256 mismatch" % (MODEL, digest) in bad.stdout
    fixed = run_cli("repair", MODEL, env=env)
    assert fixed.returncode == 0 and "1 blob(s) repaired" in fixed.stdout
    assert run_cli("verify", MODEL, env=env).returncode == 0


def test_pull_repair_and_verify_share_the_coordinator_loop(registry, models_dir):
    env = node_env(models_dir, registry.url)
    assert run_cli("pull", MODEL, env=env).returncode == 0
    layer, blob = blob_of(models_dir)
    with open(blob, "r+b") as f:
        f.seek(layer["size"] // 2)
        f.write(b"\xff" * 64)
    bad = run_cli("verify", MODEL, env=env)
    assert bad.returncode == 1 and "CORRUPTED" in bad.stdout
    served = registry.bytes_served[layer["digest"]]
    fixed = run_cli("repair", MODEL, env=env)
    assert fixed.returncode == 0 and "1 blob(s) repaired" in fixed.stdout
    assert registry.bytes_served[layer["digest"]] - served == layer["size"]
    assert "Starting auto-repair for model: gpt-oss:7b" in fixed.stderr
    assert run_cli("verify", MODEL, env=env).returncode == 0


def test_a_registry_with_extra_layers_is_pulled_whole(registry, models_dir):
    registry.add_model("library/extra", "1", b"GGUF" + b"\0" * 100,
                       extra_layers=[("application/vnd.ollama.image.template", b"{{ .Prompt }}")])
    result = run_cli("pull", "extra:1", env=node_env(models_dir, registry.url))
    assert result.returncode == 0, result.stderr
    manifest = Store(models_dir).read_manifest(names.parse("extra:1"))
    assert MODEL_TYPE in [la["mediaType"] for la in manifest["layers"]]
    assert assert_no_blob_under_a_wrong_digest(models_dir) == 3
