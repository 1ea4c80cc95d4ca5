import os
import re

from tests.conftest import run_cli


def test_demo_shows_the_repair_offline_and_cleans_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env["LLM_CPU_THREADS"] = "1"
    result = run_cli("demo", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("HTTP 200") == 2
    assert "[INFO] Starting auto-repair for model: tiny:demo" in result.stderr
    assert re.search(r"\[INFO\] Auto-repair completed: tiny:demo \(elapsed: \d+s\)", result.stderr)
    assert "the blob matches its digest again: True" in out
    workdir = re.search(r"cleaned up (\S+)", out).group(1)
    assert not os.path.exists(workdir)
