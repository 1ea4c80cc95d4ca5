"""50 requests for a model under repair while a healthy model is in use: the healthy model and
/health don't wait; the waiters past LLM_MAX_REPAIR_WAITERS get 503 + Retry-After; all others
are answered."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import blob_of, node_env, run_cli, wait_for
from tests.tinymodel import write_tiny_gguf

N = 50


def chat(url, model):
    return requests.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "test"}], "max_tokens": 2})


def test_fifty_waiters_on_a_repair_do_not_starve_health_or_a_healthy_model(
        pulled, registry, start_node, tmp_path):
    registry.add_model("library/healthy", "1", write_tiny_gguf(tmp_path / "h.gguf", seed=1).read_bytes())
    env = node_env(pulled, registry.url, LLM_MAX_LOADED_MODELS=2)
    assert run_cli("pull", "healthy:1", env=env).returncode == 0
    node = start_node(env)
    assert chat(node.url, "healthy:1").status_code == 200
    layer, blob = blob_of(pulled)
    with open(blob, "w") as f:
        f.write("corrupted\n")
    registry.gate = threading.Event()
    health_latencies = []

    def health():
        started = time.monotonic()
        r = requests.get(node.url + "/health", timeout=5)
        health_latencies.append(time.monotonic() - started)
        assert r.status_code == 200
        return r.json()

    pool = ThreadPoolExecutor(N)
    try:
        futures = [pool.submit(chat, node.url, "gpt-oss:7b") for _ in range(N)]

        def all_but_two_waiting():
            repairs = health()["repairs"]
            return repairs and repairs[0]["waiting_requests"] == 48 and sum(f.done() for f in futures) == 2

        wait_for(all_but_two_waiting, "48 requests waiting on the repair and 2 refused", timeout=60)
        busy = [f.result() for f in futures if f.done()]
        assert len(busy) == N - 48
        for r in busy:
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_under_repair"
            assert int(r.headers["Retry-After"]) > 0
        for _ in range(5):
            assert chat(node.url, "healthy:1").status_code == 200
            health()
        for _ in range(20):
            health()
    finally:
        registry.gate.set()
    wait_for(lambda: health() and all(f.done() for f in futures), "every request answered", timeout=120)
    answers = [f.result() for f in futures]
    pool.shutdown()
    assert sum(r.status_code == 200 for r in answers) == 48
    assert registry.bytes_served[layer["digest"]] == 2 * layer["size"]  # the pull, and one repair
    # /health and the healthy model were answered while the repair could not progress (the
    # registry held its body): neither waited on it. Each probe had a 5 s deadline.
    print("health: %d probes, max %.1f ms" % (len(health_latencies), 1000 * max(health_latencies)))
