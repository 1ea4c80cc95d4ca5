"""SIGKILL the node at points spread across a repair's download; restarted, it finishes the repair
fetching no more than what was missing plus one chunk, and leaves no stray files."""

import os
import re
import signal
import threading

import pytest
import requests

from repair.download import NET_CHUNK
from repair.store import Store
from tests.conftest import blob_of, node_env, wait_for

POINTS = [1, 40_000, 70_000, 100_000, 140_000, 200_000, 260_000, 300_000, 350_000, 400_000,
          440_000, 469_000]
CHAT = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "test"}], "max_tokens": 2}


def stray_files(models_dir):
    """Temporary files left anywhere in the store."""
    found = []
    for d, _, files in os.walk(models_dir):
        found += [os.path.join(d, f) for f in files if ".tmp-" in f or f.endswith("-partial")]
    return found


@pytest.mark.parametrize("cut", POINTS)
def test_a_node_killed_mid_repair_resumes_after_restart(pulled, registry, start_node, cut):
    layer, blob = blob_of(pulled)
    with open(blob, "w") as f:
        f.write("corrupted\n")
    env = node_env(pulled, registry.url)
    node = start_node(env)
    registry.faults = [("stall", cut, 60)]
    sent_before = registry.bytes_served[layer["digest"]]
    threading.Thread(target=lambda: _post_ignoring_errors(node.url), daemon=True).start()
    received = cut // NET_CHUNK * NET_CHUNK

    def download_reached_cut():
        # The registry has counted the bytes up to the cut (it stalls there), so none it sends
        # this node is counted after the restart; and the node has written `received` of them.
        if registry.bytes_served[layer["digest"]] - sent_before < cut:
            return False
        repairs = requests.get(node.url + "/health", timeout=5).json()["repairs"]
        return repairs and repairs[0]["bytes_done"] >= received

    wait_for(download_reached_cut, "the download never reached byte %d" % received)
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(timeout=10)
    partial = Store(pulled).partial_path(layer["digest"])
    kept = os.path.getsize(partial) if os.path.exists(partial) else 0
    assert kept >= received

    served_before = registry.bytes_served[layer["digest"]]
    again = start_node(env)
    r = requests.post(again.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text
    fetched_again = registry.bytes_served[layer["digest"]] - served_before
    missing = layer["size"] - cut
    assert fetched_again <= missing + NET_CHUNK
    assert stray_files(pulled) == []
    resumed = re.search(r"resuming sha256:\w+ from byte (\d+)", again.log())
    if kept:
        assert resumed and 0 < int(resumed.group(1)) <= kept, again.log()
    else:
        # Nothing reached the disk before the kill (a cut inside the first network read): the
        # restart downloads the whole blob, and says nothing of resuming.
        assert resumed is None and fetched_again >= layer["size"]


def _post_ignoring_errors(url):
    try:
        requests.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
    except requests.RequestException:
        pass
