"""Every layer an answer depends on is checked against its digest when it is read: a template,
system or params layer rotted in place (size and times unchanged) across a restart is repaired
before the answer, or the request is refused; `verify` and the scrubber find each."""

import json
import os

import pytest
import requests

import llmnode
from repair import names
from repair.scrub import Scrubber
from tests.conftest import blob_of, intact, node_env, run_cli, settings_for

STYLED = "styled:1"
PARAMS = {"num_predict": 3, "temperature": 0, "seed": 1}
LAYERS = [("application/vnd.ollama.image.template", b"{{ .System }} {{ .Prompt }}"),
          ("application/vnd.ollama.image.params", json.dumps(PARAMS).encode()),
          ("application/vnd.ollama.image.system", b"You are terse."),
          ("application/vnd.ollama.image.license", b"Apache License 2.0")]
# What the rot turns each layer into: the same size, still a plausible layer, and an answer
# (or /api/show) that differs if it is used.
ROT = {"template": (b"{{ .System }}", b"{{ .Prompt }}"),
       "params": (b'"num_predict": 3', b'"num_predict": 9'),
       "system": (b"You are terse.", b"You are LOUD!.")}
CHAT = {"model": STYLED, "stream": False, "messages": [{"role": "user", "content": "Tell me a story."}]}


@pytest.fixture
def styled(registry, tiny_gguf, models_dir):
    registry.add_model("library/styled", "1", tiny_gguf, extra_layers=LAYERS)
    env = node_env(models_dir, registry.url)
    assert run_cli("pull", STYLED, env=env).returncode == 0
    return env


def rot_layer(models_dir, kind):
    """Rewrite the layer's bytes in place as ROT says, and put its times back."""
    layer, path = blob_of(models_dir, ("styled", "1"), kind)
    st = os.stat(path)
    data = open(path, "rb").read()
    old, new = ROT[kind]
    assert old in data and len(old) == len(new)
    with open(path, "r+b") as f:
        f.write(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return layer, path


def seen(node):
    """The answer and what /api/show says: everything a rotten layer would change."""
    r = requests.post(node.url + "/api/chat", json=CHAT, timeout=60)
    show = requests.post(node.url + "/api/show", json={"model": STYLED}, timeout=60)
    if r.status_code != 200:
        return r.status_code, r.json()
    assert show.status_code == 200, show.text
    return (r.json()["message"]["content"], r.json()["eval_count"], r.json()["prompt_eval_count"],
            show.json()["template"], show.json()["parameters"], show.json()["system"])


@pytest.mark.parametrize("kind", sorted(ROT))
def test_a_rotten_layer_across_a_restart_is_repaired_before_the_answer(styled, models_dir, start_node,
                                                                       kind):
    node = start_node(styled)
    before = seen(node)
    node.stop()
    layer, path = rot_layer(models_dir, kind)
    again = start_node(styled)
    assert seen(again) == before
    assert intact(path, layer)
    log = again.log()
    assert "model %s: blob %s is corrupted: sha256 mismatch" % (STYLED, layer["digest"]) in log
    assert "Starting auto-repair for model: %s" % STYLED in log
    assert "Auto-repair completed: %s" % STYLED in log


@pytest.mark.parametrize("kind", sorted(ROT))
def test_a_rotten_layer_with_auto_repair_off_is_refused(styled, models_dir, start_node, kind):
    layer, path = rot_layer(models_dir, kind)
    node = start_node(dict(styled, LLM_AUTO_REPAIR="false"))
    for route, body in (("/api/chat", CHAT), ("/api/show", {"model": STYLED})):
        r = requests.post(node.url + route, json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert "auto-repair is disabled" in r.json()["error"] and STYLED in r.json()["error"]
    assert not intact(path, layer)


@pytest.mark.parametrize("kind", sorted(ROT))
def test_verify_exits_1_on_a_rotten_layer(styled, models_dir, kind):
    layer, _path = rot_layer(models_dir, kind)
    result = run_cli("verify", STYLED, env=styled)
    assert result.returncode == 1, result.stdout
    assert "%s  %s  CORRUPTED: sha256 mismatch" % (STYLED, layer["digest"]) in result.stdout


@pytest.mark.parametrize("kind", sorted(ROT))
def test_the_scrubber_repairs_a_rotten_layer(styled, registry, models_dir, kind):
    layer, path = rot_layer(models_dir, kind)
    node = llmnode.Node(settings_for(models_dir, registry.url))
    findings = Scrubber(node.store, node.repairs, interval=3600).run_once()
    assert findings == [(STYLED, layer["digest"], "repaired")]
    assert intact(path, layer)


def test_the_config_blob_is_verified_too(styled, models_dir):
    manifest = json.load(open(os.path.join(models_dir, "manifests", "registry.ollama.ai", "library",
                                           "styled", "1")))
    path = os.path.join(models_dir, "blobs", manifest["config"]["digest"].replace(":", "-"))
    with open(path, "r+b") as f:
        f.write(b"[")
    result = run_cli("verify", STYLED, env=styled)
    assert result.returncode == 1 and manifest["config"]["digest"] in result.stdout


def test_a_layer_that_rots_after_it_was_read_is_checked_again_on_the_next_read(styled, registry,
                                                                             models_dir):
    node = llmnode.Node(settings_for(models_dir, registry.url))
    ref = names.parse(STYLED)
    texts = node.repairs.layer_texts(ref)
    assert texts["system"] == "You are terse." and json.loads(texts["params"]) == PARAMS
    layer, path = rot_layer(models_dir, "params")
    assert node.repairs.layer_texts(ref) == texts
    assert intact(path, layer)
    assert node.metrics.get("llmnode_repairs_completed_total") == 1
