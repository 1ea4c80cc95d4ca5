"""A fleet behind a pull-through mirror (SPEC.md, "Fleet"): Debian's docker-registry with
`proxy.remoteurl` in front of an upstream that counts every byte it sends."""

import hashlib
import os
import re
import subprocess
import sys

import pytest

from repair.chunks import CHUNK_SIZE
from tests.conftest import ROOT, node_env, wait_for
from tests.distribution import Distribution
from tests.fakeregistry import FakeRegistry, digest_of

NODES = 3
SIZE = 3 * CHUNK_SIZE  # three chunks, so a range repair is visibly less than the blob


@pytest.fixture
def fleet(tmp_path):
    upstream = FakeRegistry().start()
    weights = b"GGUF" + os.urandom(SIZE - 4)
    upstream.add_model("library/fleet", "1", weights)
    (tmp_path / "mirror").mkdir()
    mirror = Distribution(tmp_path / "mirror", proxy_url=upstream.url)
    yield upstream, mirror, digest_of(weights)
    mirror.stop()
    upstream.stop()


def llmnode(command, models_dir, mirror_url):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "llmnode.py"), command, "fleet:1"],
                            env=node_env(models_dir, mirror_url), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_nodes_pull_through_the_mirror_and_repair_by_range_through_it(fleet, tmp_path):
    upstream, mirror, digest = fleet
    stores = [str(tmp_path / ("node%d" % i)) for i in range(NODES)]
    # The first node warms the mirror; the rest pull at once. (distribution's proxy streams a
    # separate upstream copy to each request that arrives while the blob is not yet cached, so
    # a fleet started cold all at once costs the upstream up to one copy a node: README, Fleet.)
    first = llmnode("pull", stores[0], mirror.url)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    # On a miss the proxy streams the blob to the client and, in the background, fetches it
    # again into its storage; the fleet goes on once the mirror holds it.
    cached = tmp_path / "mirror" / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / \
        digest[7:9] / digest[7:] / "data"
    wait_for(lambda: cached.exists() and cached.stat().st_size == SIZE, "the mirror never stored the blob",
             timeout=60)
    warmed = upstream.bytes_served[digest]
    pulls = [llmnode("pull", store, mirror.url) for store in stores[1:]]
    for p in pulls:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    blob_name = digest.replace(":", "-")
    for store in stores:
        data = open(os.path.join(store, "blobs", blob_name), "rb").read()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    sent = upstream.bytes_served[digest]
    print("%d nodes pulled %d bytes each; the upstream sent %d bytes (%.2f blobs)"
          % (NODES, SIZE, sent, sent / SIZE))
    assert warmed <= 2 * SIZE  # the first miss: one copy to the node, one into the mirror
    assert sent == warmed  # every other node cost the upstream nothing

    # 64 KiB of damage on one node: repaired by range, through the mirror, not the upstream.
    with open(os.path.join(stores[0], "blobs", blob_name), "r+b") as f:
        f.seek(CHUNK_SIZE + 1000)
        f.write(os.urandom(64 << 10))
    repair = llmnode("repair", stores[0], mirror.url)
    out, err = repair.communicate(timeout=300)
    assert repair.returncode == 0, err
    fetched = int(re.search(r"damaged chunk\(s\) fetched again by range \((\d+) bytes\)", err).group(1))
    assert fetched == CHUNK_SIZE
    data = open(os.path.join(stores[0], "blobs", blob_name), "rb").read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert upstream.bytes_served[digest] == sent  # the mirror answered the range itself
