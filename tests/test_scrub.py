"""The scrubber: a pass finds bit rot (and reports it when auto-repair is off), the background
scrub repairs it without a request, and a pass goes on past a failing disk."""

import errno

import llmnode
from repair import names
from repair.scrub import Scrubber
from repair.store import model_layer
from tests.conftest import blob_of, intact, node_env, pull, rot, run_cli, settings_for, wait_for


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
    wait_for(lambda: "Auto-repair completed: gpt-oss:7b" in node.log(), "the scrub's repair", timeout=60)
    assert "model gpt-oss:7b: blob %s is corrupted" % layer["digest"] in node.log()
    assert intact(blob, layer)


class _FailingDisk:
    """A coordinator whose first model's check meets EIO (a failing disk), then works."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def check_model(self, ref):
        self.calls.append(str(ref))
        if len(self.calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return self.real.check_model(ref)


def test_the_scrubber_goes_on_after_a_failing_disk(registry, models_dir, caplog):
    from tests.conftest import settings_for
    from tests.tinymodel import write_tiny_gguf
    write_tiny_gguf(models_dir + "-o.gguf", seed=2)
    registry.add_model("library/other", "1", open(models_dir + "-o.gguf", "rb").read())
    env = node_env(models_dir, registry.url)
    for name in ("gpt-oss:7b", "other:1"):
        assert run_cli("pull", name, env=env).returncode == 0
    node = llmnode.Node(settings_for(models_dir, registry.url))
    disk = _FailingDisk(node.repairs)
    scrub = Scrubber(node.store, disk, interval=3600, metrics=node.metrics)
    findings = scrub.run_once()
    assert len(disk.calls) == 2  # the second model was still checked
    assert [f[0] for f in findings] == [disk.calls[0]] and "Input/output error" in findings[0][2]
    assert "llmnode_scrub_errors_total 1" in node.metrics.render()
    assert "Traceback" in caplog.text
    assert scrub.run_once() == []  # and the next pass runs
