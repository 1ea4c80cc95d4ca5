import time

import llmnode
from repair import names
from repair.scrub import Scrubber
from repair.store import model_layer
from tests.conftest import blob_of, intact, node_env, pull, rot, settings_for


def test_a_scrub_pass_finds_bit_rot_and_reports_it_when_repair_is_off(registry, models_dir):
    node = llmnode.Node(settings_for(models_dir, registry.url, LLM_AUTO_REPAIR="false"))
    ref = names.parse("gpt-oss:7b")
    pull(node.client, node.store, node.guard, ref)
    layer = model_layer(node.store.read_manifest(ref))
    assert node.guard.unchanged(layer)
    scrub = Scrubber(node.store, node.repairs, interval=3600)
    assert scrub.run_once() == []
    rot(node.store.blob_path(layer["digest"]))
    assert node.guard.unchanged(layer)
    findings = scrub.run_once()
    assert [m for m, _, _ in findings] == ["gpt-oss:7b"]
    assert "sha256 mismatch" in findings[0][2] and "auto-repair is disabled" in findings[0][2]


def test_the_background_scrub_repairs_bit_rot_without_a_request(pulled, registry, start_node):
    layer, blob = blob_of(pulled)
    node = start_node(node_env(pulled, registry.url, LLM_SCRUB_INTERVAL_SECS=1))
    rot(blob)
    deadline = time.monotonic() + 60
    while "Auto-repair completed: gpt-oss:7b" not in node.log():
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.05)
    assert "model gpt-oss:7b: blob %s is corrupted" % layer["digest"] in node.log()
    assert intact(blob, layer)
