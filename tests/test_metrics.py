import re

import requests

from repair.metrics import Metrics
from tests.conftest import rot, weights

CHAT = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "test"}], "max_tokens": 4}
LINE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+$')


def parse(text):
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_metrics_count_requests_repairs_bytes_and_verification(serve, registry):
    s = serve()
    layer, path = weights(s.node)
    rot(path, keep_times=False)
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    assert s.post("/v1/chat/completions", dict(CHAT, model="../x")).status_code == 400
    r = requests.get(s.url + "/metrics", timeout=5)
    assert r.headers["Content-Type"].startswith("text/plain")
    m = parse(r.text)
    assert m['llmnode_requests_total{status="200"}'] == 1
    assert m['llmnode_requests_total{status="400"}'] == 1
    assert m["llmnode_repairs_started_total"] == 1 == m["llmnode_repairs_completed_total"]
    assert m["llmnode_repairs_failed_total"] == 0 and m["llmnode_repairs_in_progress"] == 0
    assert m["llmnode_download_bytes_total"] == layer["size"]
    assert m["llmnode_corrupted_blobs_found_total"] == 1
    assert m["llmnode_verify_seconds_total"] > 0


def test_every_series_has_help_and_type_even_at_zero():
    text = Metrics().render()
    for name in ("llmnode_requests_total", "llmnode_repairs_in_progress"):
        assert "# TYPE %s" % name in text and "\n%s 0\n" % name in text
