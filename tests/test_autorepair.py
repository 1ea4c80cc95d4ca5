"""The user's two scenarios, as written, against a real node process and a loopback registry."""

import hashlib
import subprocess
import threading
import time

import pytest
import requests

from tests.conftest import MODEL, blob_of, bodies, node_env, wait_for

CURL = ('curl -X POST {url}/v1/chat/completions \\\n'
        '  -H "Content-Type: application/json" \\\n'
        '  -d \'{{"model": "gpt-oss:7b", "messages": [{{"role": "user", "content": "test"}}]}}\'')


def test_scenario_1_a_corrupted_model_is_repaired_and_answered(pulled, registry, start_node, tmp_path):
    log_file = tmp_path / "llm-node.log"
    node = start_node(node_env(pulled, registry.url, LLM_LOG_FILE=log_file))
    layer, blob = blob_of(pulled)
    subprocess.run('echo "corrupted" > %s' % blob, shell=True, check=True)
    started = time.monotonic()
    out = subprocess.run(CURL.format(url=node.url), shell=True, capture_output=True, text=True,
                         timeout=120)
    elapsed = time.monotonic() - started
    [reply] = bodies(out.stdout)
    assert reply["object"] == "chat.completion" and reply["model"] == MODEL
    assert "sha256:" + hashlib.sha256(open(blob, "rb").read()).hexdigest() == layer["digest"]
    log = log_file.read_text()
    repair_lines = [line for line in log.splitlines() if "auto-repair" in line.lower()]  # grep -i
    assert repair_lines[0] == "[INFO] Starting auto-repair for model: gpt-oss:7b"
    assert repair_lines[-1].startswith("[INFO] Auto-repair completed: gpt-oss:7b (elapsed: ")
    assert repair_lines[-1].endswith("s)")
    prefix = "[INFO] Downloading model: gpt-oss:7b ("
    progress = [line for line in log.splitlines() if line.startswith(prefix)]
    percents = [int(line.rsplit("(", 1)[1].rstrip("%)")) for line in progress]
    assert 1 <= len(percents) <= 10 and percents == sorted(set(percents)) and percents[-1] == 100
    print("scenario 1: answered %.2fs after the corruption" % elapsed)


@pytest.mark.parametrize("n", [5, 20])
def test_scenario_2_concurrent_requests_share_one_repair(pulled, registry, start_node, tmp_path, n):
    log_file = tmp_path / "llm-node.log"
    node = start_node(node_env(pulled, registry.url, LLM_LOG_FILE=log_file))
    layer, blob = blob_of(pulled)
    before = registry.bytes_served[layer["digest"]]
    subprocess.run('echo "corrupted" > %s' % blob, shell=True, check=True)
    registry.gate = threading.Event()
    script = "for i in {1..%d}; do\n  %s &\ndone\nwait\n" % (n, CURL.format(url=node.url))
    started = time.monotonic()
    clients = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:

        def all_waiting():
            repairs = requests.get(node.url + "/health", timeout=5).json()["repairs"]
            return repairs if repairs and repairs[0]["waiting_requests"] == n else None

        repairs = wait_for(all_waiting, "requests never all waited", timeout=60)
        assert repairs[0]["model"] == MODEL and repairs[0]["bytes_total"] == layer["size"]
    finally:
        registry.gate.set()
    out, _ = clients.communicate(timeout=120)
    elapsed = time.monotonic() - started
    replies = bodies(out)
    assert len(replies) == n
    assert [r for r in replies if r.get("object") != "chat.completion"] == [], node.log()[-3000:]
    assert registry.bytes_served[layer["digest"]] - before == layer["size"]
    assert log_file.read_text().count("Starting auto-repair for model: gpt-oss:7b") == 1
    print("scenario 2 (%d requests): all answered %.2fs after they were sent" % (n, elapsed))
