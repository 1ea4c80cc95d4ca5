"""Benchmarks (`tox -e bench`): llmnode against reference tools in the same run, the two sides
alternated, medians and ratios printed. Not part of the test run.

Reading the figures: compare ratios, not absolute figures (a shared machine's speed moves from day
to day, both sides alike; run-to-run spread is a few percent on serving rows, more on the loopback
repair). Repair vs bare `curl` also hashes the file and its chunk table (two sha256 passes) and
fsyncs, which `curl` does not; the table is what makes later range repairs possible. Load + verify
hashes on every core while llama.cpp loads on one; on 2 cores a large blob's check (about 0.6
core-seconds of SHA-256 per 0.9 GiB) no longer hides behind a load without extra buffers. The
serving rows run each server and the clients in their own processes; the load rows run both sides
on the node's compute thread (two threads running llama.cpp would each keep an OpenMP team
spinning). Debian's `sha256sum` runs at about 280 MB/s here, hashlib (OpenSSL, SHA extensions) at
about 1.3 GB/s."""

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import conf  # noqa: E402
import llmnode  # noqa: E402
from repair import names, operations  # noqa: E402
from repair.chunks import bad_chunks, hash_file  # noqa: E402
from repair.coordinator import RepairCoordinator  # noqa: E402
from repair.download import fetch_blob  # noqa: E402
from repair.guard import IntegrityGuard  # noqa: E402
from repair.hashing import sha256_file  # noqa: E402
from repair.registry import RegistryClient  # noqa: E402
from repair.store import Store  # noqa: E402
from tests.distribution import Distribution, free_port  # noqa: E402
from tests.fakeregistry import CONFIG_TYPE, MANIFEST_TYPE, MODEL_TYPE, digest_of  # noqa: E402
from tests.throttle import ThrottlingProxy  # noqa: E402
from tests.tinymodel import write_tiny_gguf  # noqa: E402

ROWS = []
# What the node uses unless told otherwise.
DEFAULT_CONNECTIONS = conf.BY_KEY["download_connections"].convert(conf.BY_KEY["download_connections"].default)


def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternate(rounds, ours, theirs):
    """Run the two sides in turn; (median ours, median theirs). Dirty pages are flushed before
    each run (untimed), so neither side pays for the disk writes the other left behind."""
    a, b = [], []
    for _ in range(rounds):
        os.sync()
        a.append(timed(ours))
        os.sync()
        b.append(timed(theirs))
    return statistics.median(a), statistics.median(b)


def report(name, ours, theirs, unit, aim, ratio=None):
    ratio = ours / theirs if ratio is None else ratio
    ROWS.append((name, ours, theirs, unit, ratio, aim))
    print("%-58s ours %9.3f %-4s ref %9.3f %-4s ratio %6.3f  (aim %s)"
          % (name, ours, unit, theirs, unit, ratio, aim), flush=True)


def make_blob(path, size):
    """GGUF magic then random bytes; returns the digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        first = b"GGUF"
        while left:
            piece = first + os.urandom(min(64 << 20, left) - len(first))
            first = b""
            f.write(piece)
            h.update(piece)
            left -= len(piece)
    return "sha256:" + h.hexdigest()


def bench_verify(blob, rounds):
    print("\n== a. full verification of %s vs sha256sum" % human(os.path.getsize(blob)))
    ours, theirs = alternate(rounds, lambda: hash_file(blob),
                             lambda: subprocess.run(["sha256sum", blob], check=True, capture_output=True))
    report("verify (whole digest + chunk table) vs sha256sum", ours, theirs, "s", "<= 1.05")
    table = hash_file(blob)[1]
    size = os.path.getsize(blob)
    single, parallel = alternate(rounds, lambda: sha256_file(blob), lambda: bad_chunks(blob, table, size))
    report("single-stream sha256 vs chunk-table check on %d cores" % os.cpu_count(),
           parallel, single, "s", ">= 1.7 speed-up", ratio=single / parallel)


def bench_repair(blob, digest, size, work, rounds):
    print("\n== b. repair of a %s blob from docker-registry on loopback vs curl" % human(size))
    (work / "registry").mkdir()
    dist = Distribution(work / "registry")
    try:
        with open(blob, "rb") as f:
            dist.push_blob("library/big", digest, f)
        config = b'{"model_format":"gguf"}'
        dist.push_blob("library/big", digest_of(config), config)
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                    "config": {"mediaType": CONFIG_TYPE, "digest": digest_of(config), "size": len(config)},
                    "layers": [{"mediaType": MODEL_TYPE, "digest": digest, "size": size}]}
        dist.push_manifest("library/big", "1", json.dumps(manifest).encode())
        ref = names.parse("%s/library/big:1" % dist.host)
        layer = manifest["layers"][0]
        url = "%s/v2/library/big/blobs/%s" % (dist.url, digest)
        out = work / "curl.out"

        def ours():
            store = Store(str(work / "store"))
            shutil.rmtree(store.root, ignore_errors=True)
            fetch_blob(RegistryClient("https://unused.example"), store, ref, layer,
                       connections=DEFAULT_CONNECTIONS)

        def curl():
            subprocess.run(["curl", "-sf", "-o", str(out), url], check=True)

        def curl_sha():
            curl()
            subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)

        a, b = alternate(rounds, ours, curl)
        report("repair (download+verify+install) vs curl -o", a, b, "s", "<= 1.10")
        a, b = alternate(rounds, ours, curl_sha)
        report("repair vs curl -o && sha256sum", a, b, "s", "< 1.0")
        bench_memory(ref, layer, work)
        bench_range_repair(dist, ref, layer, work)
        bench_parallel(dist, layer, work, rounds)
    finally:
        dist.stop()


def bench_memory(ref, layer, work):
    print("\n== e. peak memory of a repair of %s" % human(layer["size"]))
    script = """
import json, sys
sys.path.insert(0, %r)
from repair import names
from repair.download import fetch_blob
from repair.registry import RegistryClient
from repair.store import Store
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
idle = rss("VmRSS:")
fetch_blob(RegistryClient("https://unused.example"), Store(%r), names.parse(%r), json.loads(%r),
           connections=%d)
print(idle, rss("VmHWM:"))
""" % (str(ROOT), str(work / "memstore"), str(ref), json.dumps(layer), DEFAULT_CONNECTIONS)
    idle, peak = map(int, subprocess.run([sys.executable, "-c", script], check=True,
                                         capture_output=True, text=True).stdout.split())
    shutil.rmtree(work / "memstore", ignore_errors=True)
    above = (peak - idle) / (1 << 20)
    ROWS.append(("peak memory above idle during repair", above, 64, "MiB", above / 64, "< 64 MiB"))
    print("%-58s %.1f MiB above idle (idle %.1f MiB, peak %.1f MiB)  (aim < 64 MiB)"
          % ("peak memory during repair", above, idle / (1 << 20), peak / (1 << 20)))


def bench_range_repair(dist, ref, layer, work, rate=50 << 20):
    print("\n== 3. range repair of a 64 KiB corruption vs a full repair, behind a %d MiB/s link"
          % (rate >> 20))
    proxy = ThrottlingProxy(int(dist.host.split(":")[1]), link_bytes_per_sec=rate)
    proxied = names.parse("127.0.0.1:%d/library/big:1" % proxy.port)
    store = Store(str(work / "rangestore"))
    shutil.rmtree(store.root, ignore_errors=True)
    client = RegistryClient("https://unused.example")
    guard = IntegrityGuard(store)
    full_started = time.perf_counter()
    operations.pull(RepairCoordinator(store, client, guard, connections=DEFAULT_CONNECTIONS), proxied)
    full = time.perf_counter() - full_started
    full_bytes = proxy.bytes_down
    repairs = RepairCoordinator(store, client, guard, connections=DEFAULT_CONNECTIONS)
    path = store.blob_path(layer["digest"])
    with open(path, "r+b") as f:
        f.seek(layer["size"] // 2)
        f.write(os.urandom(64 << 10))
    before = proxy.bytes_down
    started = time.perf_counter()
    assert repairs.ensure(proxied).repaired
    took = time.perf_counter() - started
    moved = proxy.bytes_down - before
    assert "sha256:" + sha256_file(path) == layer["digest"]
    proxy.close()
    shutil.rmtree(store.root, ignore_errors=True)
    report("range repair vs full repair (time)", took, full, "s", "< 0.10")
    ROWS.append(("range repair bytes on the wire", moved, full_bytes, "B", moved / full_bytes,
                 "<= 2 chunks"))
    print("%-58s %d bytes (%.1f chunks of 8 MiB) vs %d for the whole blob"
          % ("range repair transfer", moved, moved / (8 << 20), full_bytes))


def bench_parallel(dist, layer, work, rounds, rate=32 << 20, counts=(1, 2, 4)):
    print("\n== 4. parallel ranged download of %s behind a %d MiB/s per-connection cap"
          % (human(layer["size"]), rate >> 20))
    proxy = ThrottlingProxy(int(dist.host.split(":")[1]), bytes_per_sec=rate)
    proxied = names.parse("127.0.0.1:%d/library/big:1" % proxy.port)
    store = Store(str(work / "partstore"))

    def fetch(n):
        shutil.rmtree(store.root, ignore_errors=True)
        fetch_blob(RegistryClient("https://unused.example"), store, proxied, layer, connections=n)
        assert "sha256:" + sha256_file(store.blob_path(layer["digest"])) == layer["digest"]

    times = {n: [] for n in counts}
    try:
        for _ in range(rounds):
            for n in counts:
                os.sync()
                times[n].append(timed(lambda n=n: fetch(n)))
    finally:
        proxy.close()
        shutil.rmtree(store.root, ignore_errors=True)
    one = statistics.median(times[1])
    print("%-58s %.2f s (%.1f MiB/s)" % ("1 connection", one, layer["size"] / one / (1 << 20)))
    for n in counts[1:]:
        many = statistics.median(times[n])
        report("%d connections vs 1 (speed-up)" % n, many, one, "s", ">= %.1f" % (0.8 * n),
               ratio=one / many)


class Served:
    """`python llmnode.py` in its own process, as the reference server runs in its own: the
    load generator's threads must not share a GIL with either side."""

    def __init__(self, env, log=None):
        port = free_port()
        self.url = "http://127.0.0.1:%d" % port
        self._log = open(log, "a") if log else subprocess.DEVNULL  # the node's log lines, if kept
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "llmnode.py"), "serve"],
                                     env=dict(os.environ, LLM_PORT=str(port), **env),
                                     stdout=subprocess.DEVNULL, stderr=self._log)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def wait_until_up(url, proc, timeout=120, path="/v1/models"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url + path, timeout=1).status_code == 200:
                return True
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            return False
        time.sleep(0.2)


def _client_loop(args):
    url, body, count = args[:3]
    path = args[3] if len(args) > 3 else "/v1/chat/completions"
    times = []
    with requests.Session() as s:
        for _ in range(count):
            started = time.perf_counter()
            r = s.post(url + path, json=body, timeout=120)
            r.raise_for_status()
            times.append(time.perf_counter() - started)
    return times


def _ready(_):
    return os.getpid()


def load(url, model, max_tokens, clients, per_client, body=None, path="/v1/chat/completions"):
    """(requests per second, p50 s, p99 s) for `clients` concurrent request loops, each in its
    own process: client threads sharing one GIL would add their own waits to the tail."""
    body = body or {"model": model, "max_tokens": max_tokens, "seed": 1, "temperature": 0,
                    "messages": [{"role": "user", "content": "Hello there"}]}
    with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_ready, range(clients)))  # the client processes exist before the clock starts
        started = time.perf_counter()
        runs = list(pool.map(_client_loop, [(url, body, per_client, path)] * clients))
        elapsed = time.perf_counter() - started
    latencies = sorted(t for ts in runs for t in ts)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return len(latencies) / elapsed, p(0.50), p(0.99)


def store_with(root, name, gguf):
    """A store holding one model: the GGUF at `gguf` under `name`."""
    data = Path(gguf).read_bytes()
    digest = digest_of(data)
    store = Store(str(root))
    store.ensure_dirs()
    shutil.copyfile(gguf, store.blob_path(digest))
    config = b"{}"
    Path(store.blob_path(digest_of(config))).write_bytes(config)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": digest_of(config), "size": len(config)},
                "layers": [{"mediaType": MODEL_TYPE, "digest": digest, "size": len(data)}]}
    store.write_manifest(names.parse(name), json.dumps(manifest).encode())
    return store


def bench_serving(work, rounds, threads=2):
    print("\n== c/d. serving the tiny model: llmnode vs python -m llama_cpp.server")
    gguf = write_tiny_gguf(work / "tiny.gguf")
    store = store_with(work / "servestore", "tiny:1", gguf)
    env = {"LLM_MODELS_DIR": store.root, "LLM_CPU_THREADS": str(threads), "LLM_CTX_SIZE": "512"}
    on = Served(env)
    port = free_port()
    ref_server = subprocess.Popen(
        llama_cpp_server("--model", str(gguf), "--n_threads", str(threads),
                         "--n_ctx", "512", "--port", str(port), "--host", "127.0.0.1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref_url = "http://127.0.0.1:%d" % port
    try:
        for url, proc, what in ((ref_url, ref_server, "llama_cpp.server"), (on.url, on.proc, "llmnode")):
            if not wait_until_up(url, proc):
                print("%s did not start: serving comparison not run" % what)
                return
        for url, model in ((on.url, "tiny:1"), (ref_url, str(gguf))):
            load(url, model, 1, 1, 3)  # load the model, warm caches: measured runs start equal
        for max_tokens in (1, 32):
            ours, theirs = [], []
            for _ in range(rounds):
                ours.append(load(on.url, "tiny:1", max_tokens, 4, 100))
                theirs.append(load(ref_url, str(gguf), max_tokens, 4, 100))
            med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
            report("max_tokens=%d throughput (req/s), ref llama_cpp.server" % max_tokens,
                   med(ours, 0), med(theirs, 0), "rps", ">= 1.0", ratio=med(ours, 0) / med(theirs, 0))
            report("max_tokens=%d p50 latency" % max_tokens, med(ours, 1), med(theirs, 1), "s", "<= 1.0")
            report("max_tokens=%d p99 latency" % max_tokens, med(ours, 2), med(theirs, 2), "s", "<= 1.0")
    finally:
        ref_server.terminate()
        ref_server.wait(timeout=10)
        on.close()
    bench_guard_on_off(env, rounds)


def bench_guard_on_off(env, rounds):
    """d. with the comparison's servers stopped, so only the pair measured is running."""
    guard_on, guard_off = [], []
    # The two run the same code on a healthy model and differ by microseconds, less than two
    # processes differ: each round starts a fresh pair, in turn which first, and measures
    # them in turn.
    for i in range(2 * rounds):
        pair = [(guard_on, env), (guard_off, dict(env, LLM_AUTO_REPAIR="false"))]
        if i % 2:
            pair.reverse()
        servers = [(rows, Served(e)) for rows, e in pair]
        try:
            for _rows, srv in servers:
                if not wait_until_up(srv.url, srv.proc):
                    print("llmnode did not start: guard comparison not run")
                    return
                load(srv.url, "tiny:1", 1, 1, 3)
            for rows, srv in servers:
                rows.append(load(srv.url, "tiny:1", 1, 1, 300)[1])
        finally:
            for _rows, srv in servers:
                srv.close()
    report("d. p50 latency, auto-repair on vs off", statistics.median(guard_on),
           statistics.median(guard_off), "s", "<= 1.02")
    bench_guard(env, statistics.median(guard_on))


def bench_guard(env, p50):
    """The guard's own cost per request, in process: it runs whether auto-repair is on or off
    (off still refuses a corrupted model), so on vs off above only shows that repair is free."""
    node = llmnode.Node(conf.load(environ=env))
    ref = names.parse("tiny:1")
    node.repairs.ensure(ref)
    calls = 5000
    started = time.perf_counter()
    for _ in range(calls):
        node.repairs.ensure(ref)
    cost = (time.perf_counter() - started) / calls
    ROWS.append(("d. guard per request / p50 request latency", cost, p50, "s", cost / p50, "<= 0.02"))
    print("%-58s %.1f us per request, %.2f%% of the p50 latency  (aim <= 2%%)"
          % ("d. guard (manifest + stat check) per request", cost * 1e6, 100 * cost / p50))


def llama_cpp_server(*args):
    """The command that runs `python -m llama_cpp.server` with these arguments. On a CPU with AMX
    it loads without llama.cpp's extra weight buffers, as our node does there (their AMX kernel
    crashes on SmolLM2's Q4_1 weights; see llmnode.without_extra_buffers)."""
    if not llmnode.cpu_has_amx():
        return [sys.executable, "-m", "llama_cpp.server", *args]
    code = ("import runpy, sys; sys.path.insert(0, %r); import llmnode; llmnode.without_extra_buffers(); "
            "sys.argv = ['llama_cpp.server'] + sys.argv[1:]; runpy.run_module('llama_cpp.server', "
            "run_name='__main__', alter_sys=True)" % str(ROOT))
    return [sys.executable, "-c", code, *args]


def bench_api(work, rounds, threads=2):
    """On the real model (SmolLM2): json_schema-constrained chat and embeddings against
    `python -m llama_cpp.server`, and Ollama's /api/chat against /v1/chat/completions."""
    from tests.conftest import smollm2_path

    print("\n== f. the API on SmolLM2: llmnode vs python -m llama_cpp.server")
    gguf = smollm2_path()
    store = store_with(work / "apistore", "smol:1", gguf)
    env = {"LLM_MODELS_DIR": store.root, "LLM_CPU_THREADS": str(threads), "LLM_CTX_SIZE": "1024"}
    ours = Served(env)
    refs = {}
    for kind, extra in (("chat", []), ("embed", ["--embedding", "true"])):
        port = free_port()
        proc = subprocess.Popen(llama_cpp_server("--model", gguf, "--n_threads", str(threads), "--n_ctx",
                                                 "1024", "--port", str(port), "--host", "127.0.0.1", *extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        refs[kind] = ("http://127.0.0.1:%d" % port, proc)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
              "required": ["name", "country"]}
    ask = [{"role": "user", "content": "Describe Paris as JSON."}]
    base = {"max_tokens": 32, "seed": 1, "temperature": 0, "messages": ask}
    try:
        for url, proc in [(ours.url, ours.proc)] + list(refs.values()):
            if not wait_until_up(url, proc):
                print("a server did not start: API comparison not run")
                return
        med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
        cases = [
            ("json_schema chat, 32 tokens", "/v1/chat/completions",
             dict(base, model="smol:1", response_format={"type": "json_schema", "json_schema": {
                 "name": "city", "schema": schema}})),
            ("embeddings, one sentence", "/v1/embeddings",
             {"model": "smol:1", "input": "The quick brown fox jumps over the lazy dog."}),
        ]
        for name, path, body in cases:
            ref_url = refs["embed" if "embeddings" in path else "chat"][0]
            ref_body = dict(body, model=gguf)
            if "response_format" in body:
                ref_body["response_format"] = {"type": "json_object", "schema": schema}
            load(ours.url, None, 0, 2, 2, body=body, path=path)
            load(ref_url, None, 0, 2, 2, body=ref_body, path=path)
            a, b = [], []
            for _ in range(rounds):
                a.append(load(ours.url, None, 0, 2, 10, body=body, path=path))
                b.append(load(ref_url, None, 0, 2, 10, body=ref_body, path=path))
            report("%s: throughput, ref llama_cpp.server" % name, med(a, 0), med(b, 0), "rps", ">= 1.0",
                   ratio=med(a, 0) / med(b, 0))
            report("%s: p50 latency" % name, med(a, 1), med(b, 1), "s", "<= 1.0")
            report("%s: p99 latency" % name, med(a, 2), med(b, 2), "s", "<= 1.0")
        ollama_body = {"model": "smol:1", "messages": ask, "stream": False,
                       "options": {"num_predict": 32, "seed": 1, "temperature": 0}}
        openai_body = dict(base, model="smol:1")
        a, b = [], []
        for _ in range(rounds):
            a.append(load(ours.url, None, 0, 1, 15, body=ollama_body, path="/api/chat"))
            b.append(load(ours.url, None, 0, 1, 15, body=openai_body))
        report("/api/chat vs /v1/chat/completions p50 (same node, same model)", med(a, 1), med(b, 1),
               "s", "<= 1.02")
        # The dialects translated onto the one request: the same prompt, greedy, 32 tokens.
        dialects = [("/v1/messages", {"model": "smol:1", "max_tokens": 32, "temperature": 0,
                                      "messages": ask}),
                    ("/v1/responses", {"model": "smol:1", "max_output_tokens": 32, "temperature": 0,
                                       "input": ask[0]["content"]})]
        for path, body in dialects:
            a, b = [], []
            for _ in range(rounds):
                a.append(load(ours.url, None, 0, 1, 15, body=body, path=path))
                b.append(load(ours.url, None, 0, 1, 15, body=openai_body))
            report("%s vs /v1/chat/completions p50 (same node, same model)" % path, med(a, 1), med(b, 1),
                   "s", "<= 1.02")
    finally:
        for _url, proc in refs.values():
            proc.terminate()
            proc.wait(timeout=10)
        ours.close()


def drop_page_cache():
    """Empty the page cache (root on Linux); False where the machine does not allow it."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def bench_load(work, rounds):
    """Every load verified: load + verify vs load alone on the real model (SmolLM2) and on a
    generated 1 GiB GGUF, warm and cold page cache; the first answer after a restart, verify on
    vs off; and json_schema-constrained vs free generation on our node."""
    from tests.conftest import smollm2_path
    from tests.fakeregistry import FakeRegistry

    reg = FakeRegistry().start()
    reg.add_model("library/smollm2", "135m", Path(smollm2_path()).read_bytes())
    settings = conf.load(environ={"LLM_MODELS_DIR": str(work / "load-models"), "LLM_REGISTRY_URL": reg.url,
                                  "LLM_CTX_SIZE": "1024"})
    node = llmnode.Node(settings)
    ref = names.parse("smollm2:135m")
    operations.pull(node.repairs, ref)
    reg.stop()
    layer = node.store.read_manifest(ref)["layers"][0]
    path = node.store.blob_path(layer["digest"])
    compare_loads("SmolLM2", node, ref, layer, path, settings, rounds)

    big = work / "big.gguf"
    from repair.gguf_writer import tiny_gguf
    big.write_bytes(tiny_gguf(seed=5, n_embd=1024, n_ff=24576, n_head=8, n_layer=3))
    big_store = store_with(work / "bigstore", "big:1", big)
    big.unlink()
    big_settings = conf.load(environ={"LLM_MODELS_DIR": big_store.root, "LLM_CTX_SIZE": "256"})
    big_node = llmnode.Node(big_settings)
    big_ref = names.parse("big:1")
    big_layer = big_store.read_manifest(big_ref)["layers"][0]
    big_node.guard.verify(big_layer, gguf=True)  # its chunk table, as after a pull
    compare_loads("generated %.2f GiB GGUF" % (big_layer["size"] / (1 << 30)), big_node, big_ref,
                  big_layer, big_store.blob_path(big_layer["digest"]), big_settings, rounds)

    first_answer_after_restart(work, node.store.root, rounds)
    constrained_vs_free(node, settings, rounds)


def compare_loads(what, node, ref, layer, path, settings, rounds):
    def alone():
        # On the node's compute thread too: two threads running llama.cpp would each keep an
        # OpenMP team spinning, and the side that ran second would pay for the first.
        node.compute.run(llmnode.load_llama, path, settings).close()

    def verified():
        node.loader._load_verified(ref, layer, path).close()

    alone()
    for cache in ("warm", "cold"):
        a, b = [], []
        for _ in range(rounds * 2):
            if cache == "cold" and not drop_page_cache():
                print("(cold page cache: /proc/sys/vm/drop_caches not writable; skipped)")
                break
            a.append(timed(verified))
            if cache == "cold":
                drop_page_cache()
            b.append(timed(alone))
        if a:
            report("%s load + verify vs load alone, %s page cache" % (what, cache),
                   statistics.median(a), statistics.median(b), "s", "<= 1.15")


def first_answer_after_restart(work, models_dir, rounds):
    """From `python llmnode.py` starting to its first answer on SmolLM2, verify on vs off."""
    body = {"model": "smollm2:135m", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}]}

    def once(verify):
        env = {"LLM_MODELS_DIR": models_dir, "LLM_CTX_SIZE": "1024", "LLM_VERIFY_ON_LOAD": verify}
        started = time.perf_counter()
        server = Served(env)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
                    r.raise_for_status()
                    break
                except requests.ConnectionError:
                    assert time.monotonic() < deadline, "the node did not start"
                    time.sleep(0.01)
            return time.perf_counter() - started
        finally:
            server.close()

    on, off = [], []
    for _ in range(rounds * 2):
        on.append(once("true"))
        off.append(once("false"))
    report("SmolLM2 first answer after a restart, verify on vs off", statistics.median(on),
           statistics.median(off), "s", "informational")


def constrained_vs_free(node, settings, rounds):
    def rate(fmt):
        req = llmnode.validate_chat({"model": "smollm2:135m", "max_tokens": 64, "temperature": 0.8,
                                     "seed": 1, "messages": [{"role": "user", "content": "Describe Paris."}],
                                     **fmt}, settings.n_ctx)
        started = time.perf_counter()
        answer = node.chat(req)
        answer.collect()
        tokens = answer.usage.completion_tokens
        return tokens / (time.perf_counter() - started)

    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                         "population": {"type": "integer"}},
        "required": ["name", "country", "population"]}}}}
    free, constrained = [], []
    for _ in range(rounds * 2):
        free.append(rate({}))
        constrained.append(rate(schema))
    report("json_schema-constrained vs free generation, tokens/s", statistics.median(constrained),
           statistics.median(free), "tok/s", "informational")


# The llama-server the engine rows compare against: built from the llama.cpp that the pinned
# llama-cpp-python vendors, so both sides run the same kernels.
LLAMA_CPP_PYTHON = "0.3.36"
BENCH_CACHE = Path(os.path.expanduser("~/.cache/llmnode-bench"))
ENGINE_MODEL = "smollm2:135m"
ANSWER_TOKENS = 64
STORY_TOPICS = ("a lighthouse keeper", "a lost dragon", "a clockmaker", "a river pilot", "a desert caravan",
                "a mountain village", "a robot gardener", "a night train")
CITIES = ("Paris", "Tokyo", "Lima", "Oslo")
CITY_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                                "population": {"type": "integer"}},
               "required": ["name", "country", "population"]}


def llama_server():
    """The llama-server binary: $LLAMA_SERVER, else the cached build, else built now."""
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    binary = BENCH_CACHE / "llama-server"
    if not binary.exists():
        build_llama_server(binary)
    return str(binary)


def build_llama_server(binary):
    """llama-server from the pinned llama-cpp-python's sdist, outside the repository (about 10
    minutes on 2 cores). `binary` links into the build tree, which holds the libraries it loads."""
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    unpacked = BENCH_CACHE / ("llama_cpp_python-%s" % LLAMA_CPP_PYTHON)
    if not unpacked.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python==%s" % LLAMA_CPP_PYTHON, "-d", str(BENCH_CACHE)], check=True)
        with tarfile.open(BENCH_CACHE / ("llama_cpp_python-%s.tar.gz" % LLAMA_CPP_PYTHON)) as tar:
            tar.extractall(BENCH_CACHE, filter="data")
    source = unpacked / "vendor" / "llama.cpp"
    nice = ["nice", "-n", "10"]  # the machine may be shared: the build yields to others' work
    print("building llama-server in %s (about 10 minutes on 2 cores)" % source, flush=True)
    subprocess.run(nice + ["cmake", "-B", "build", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF",
                           "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                           "-DCMAKE_BUILD_TYPE=Release"], cwd=source, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(nice + ["cmake", "--build", "build", "--target", "llama-server", "-j",
                           os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    binary.unlink(missing_ok=True)  # a link into a build tree since removed
    binary.symlink_to(source / "build" / "bin" / "llama-server")


class LlamaServer:
    """llama.cpp's own server on the same GGUF: `parallel` slots of `n_ctx` tokens each (one KV
    buffer of parallel × n_ctx split evenly), the same threads, the GGUF's chat template."""

    ready_path = "/health"  # 503 while the model loads

    def __init__(self, binary, gguf, parallel, n_ctx, threads):
        port = free_port()
        self.url = "http://127.0.0.1:%d" % port
        self.proc = subprocess.Popen(
            [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
             "-c", str(parallel * n_ctx), "-t", str(threads), "-tb", str(threads), "--jinja"]
            # As the node on such a CPU (llmnode.without_extra_buffers): llama.cpp's AMX kernels
            # crash on SmolLM2's Q4_1 weights.
            + (["--no-repack"] if llmnode.cpu_has_amx() else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def peak_rss(pid):
    """VmHWM: the most memory the process has held resident, in bytes."""
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


def _stream(args):
    """One streamed chat: (started, first content, ended) on the monotonic clock all client
    processes share, the usage of its last chunk, and the text."""
    url, body = args
    body = dict(body, stream=True, stream_options={"include_usage": True})
    started = time.perf_counter()
    first, usage, text = None, None, []
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
            usage = chunk.get("usage") or usage
    return started, first, time.perf_counter(), usage, "".join(text)


def streams(url, bodies):
    """`bodies` streamed at once, each from its own client process: (aggregate tokens/s, slowest
    time to first token)."""
    with ProcessPoolExecutor(len(bodies), mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_ready, range(len(bodies))))  # the client processes exist before the clock starts
        runs = list(pool.map(_stream, [(url, body) for body in bodies]))
    tokens = sum(run[3]["completion_tokens"] for run in runs)
    elapsed = max(run[2] for run in runs) - min(run[0] for run in runs)
    return tokens / elapsed, max(run[1] - run[0] for run in runs)


def chat_body(model, content, system=None, history=()):
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    return {"model": model, "max_tokens": ANSWER_TOKENS, "temperature": 0, "seed": 1,
            "messages": messages + [{"role": "user", "content": content}]}


def notes(conversation, shared_opening=True, facts=50):
    """A system prompt of about 1k tokens of its own facts. With `shared_opening` every one starts
    with the same few words, as real system prompts often do; without, they differ from the first."""
    rnd = random.Random(conversation)
    things = ("lamp", "orchard", "bridge", "kettle", "harbour", "violin", "lantern", "meadow", "tower",
              "wagon", "mill", "canal", "forge", "chapel", "quarry", "barn")
    colours = ("red", "amber", "green", "blue", "grey", "white", "black", "violet")
    names = ("Maple", "Quartz", "Velvet", "Dune", "Harbor", "Tulip", "Cedar", "Onyx")
    opening = ("Notes of conversation %d." % conversation if shared_opening
               else "%s notes." % names[conversation])
    return opening + "\n" + "\n".join(
        "Fact %d: the %s %s by the %s weighs %d kilograms." % (
            n, rnd.choice(colours), rnd.choice(things), rnd.choice(things), rnd.randrange(10, 9999))
        for n in range(facts))


def one_stream(url, model):
    """Tokens/s of lone streams, each over its whole request."""
    rates = []
    for topic in STORY_TOPICS[:3]:
        started, _first, ended, usage, _text = _stream((url, chat_body(model, "Write a long story about %s."
                                                                       % topic)))
        rates.append(usage["completion_tokens"] / (ended - started))
    return statistics.median(rates)


def follow_up(url, model, conversations, shared_opening):
    """Interleaved conversations, each with its own long system prompt: every cold turn, then every
    follow-up turn. (follow-up first-token time / cold first-token time, cached prompt tokens of
    the follow-ups / their prompt tokens)."""
    question = "Which fact mentions a lamp?"
    cold, answers = [], []
    for c in range(conversations):
        body = chat_body(model, question, notes(c, shared_opening))
        started, first, _ended, _usage, text = _stream((url, body))
        cold.append(first - started)
        answers.append(text)
    warm, cached, prompt = [], 0, 0
    for c in range(conversations):
        history = [{"role": "user", "content": question}, {"role": "assistant", "content": answers[c]}]
        started, first, _ended, usage, _text = _stream(
            (url, chat_body(model, "And which one mentions a bridge?", notes(c, shared_opening), history)))
        warm.append(first - started)
        cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        prompt += usage["prompt_tokens"]
    return statistics.median(warm) / statistics.median(cold), cached / prompt


def json_streams(url, model):
    """Four answers held to one JSON schema. The node gets the schema; llama-server gets the
    grammar the node makes of it (its `grammar` field), so both write the same answers: its own
    converter allows newlines and indentation where the node's allows a space, and its answers
    to these four were ~45 tokens against the node's ~33, so tokens/s compared different texts."""
    if model == ENGINE_MODEL:
        constraint = {"response_format": {"type": "json_schema",
                                          "json_schema": {"name": "city", "schema": CITY_SCHEMA}}}
    else:
        constraint = {"grammar": llmnode.grammar(CITY_SCHEMA)}
    bodies = [dict(chat_body(model, "Describe %s as JSON." % city), **constraint) for city in CITIES]
    return streams(url, bodies)[0]


def at_four(url, model, conversations):
    """What one round asks of a server with 4 sequences (LLM_PARALLEL=4, -np 4)."""
    ratio, cached = follow_up(url, model, conversations, shared_opening=True)
    distinct, distinct_cached = follow_up(url, model, conversations, shared_opening=False)
    return {"one": one_stream(url, model), "follow": ratio, "cached": cached, "follow_distinct": distinct,
            "cached_distinct": distinct_cached, "json": json_streams(url, model)}


def at_eight(url, model, _conversations):
    """What one round asks of a server with 8 sequences: eight streams at once."""
    bodies = [chat_body(model, "Write a long story about %s." % topic) for topic in STORY_TOPICS]
    rate, slowest = streams(url, bodies)
    return {"eight": rate, "eight_ttft": slowest}


def one_server(server, model, parallel, workload):
    """Run `workload` on a freshly started server, then stop it: its figures and its peak RSS
    (MiB), or None if it did not start."""
    try:
        if not wait_until_up(server.url, server.proc, path=getattr(server, "ready_path", "/v1/models")):
            return None
        _stream((server.url, chat_body(model, "Hello")))  # the model loaded, the caches warm
        figures = workload(server.url, model, parallel)
        figures["rss%d" % parallel] = peak_rss(server.proc.pid) / (1 << 20)
        return figures
    finally:
        server.close()


def bench_engine(work, rounds, threads=2, n_ctx=2048):
    """Continuous batching and the prompt cache on SmolLM2 against llama-server: per round, per
    LLM_PARALLEL, one fresh server of each side in turn, never both at once."""
    from tests.conftest import smollm2_path
    from tests.fakeregistry import FakeRegistry

    print("\n== g. the engine on SmolLM2 vs llama-server: streamed chat, %d tokens per answer, "
          "temperature 0, %d threads, %d-token context per sequence" % (ANSWER_TOKENS, threads, n_ctx))
    binary = llama_server()
    gguf = smollm2_path()
    reg = FakeRegistry().start()
    got = {"ours": {}, "ref": {}}
    try:
        reg.add_model("library/smollm2", "135m", Path(gguf).read_bytes())
        env = {"LLM_MODELS_DIR": str(work / "engine-models"), "LLM_REGISTRY_URL": reg.url,
               "LLM_CTX_SIZE": str(n_ctx), "LLM_CPU_THREADS": str(threads)}
        subprocess.run([sys.executable, str(ROOT / "llmnode.py"), "pull", ENGINE_MODEL],
                       env=dict(os.environ, **env), check=True, capture_output=True)
        for i in range(rounds):
            for parallel, workload in ((4, at_four), (8, at_eight)):
                sides = [("ours", ENGINE_MODEL, lambda p=parallel: Served(dict(env, LLM_PARALLEL=str(p)))),
                         ("ref", gguf, lambda p=parallel: LlamaServer(binary, gguf, p, n_ctx, threads))]
                for side, model, start in sides[::-1] if i % 2 else sides:
                    figures = one_server(start(), model, parallel, workload)
                    if figures is None:
                        print("%s did not start: engine comparison not run" % side)
                        return
                    # Each server's figures as they come: a long run stopped early still tells.
                    print("   round %d, %s at %d sequences: %s" % (i + 1, side, parallel, ", ".join(
                        "%s %.3g" % item for item in sorted(figures.items()))), flush=True)
                    for key, value in figures.items():
                        got[side].setdefault(key, []).append(value)
    finally:
        reg.stop()
    ours, ref = ({key: statistics.median(values) for key, values in got[side].items()} for side in got)
    report("g. one stream tokens/s (LLM_PARALLEL=4, -np 4)", ours["one"], ref["one"], "tok/s", ">= 1.0")
    report("g. 8 streams aggregate tokens/s (LLM_PARALLEL=8, -np 8)", ours["eight"], ref["eight"],
           "tok/s", ">= 1.0")
    report("g. 8 streams slowest first token (LLM_PARALLEL=8, -np 8)", ours["eight_ttft"],
           ref["eight_ttft"], "s", "<= 1.5")
    for suffix, what in (("", "shared opening"), ("_distinct", "distinct from 1st token")):
        report("g. follow-up/cold 1st token, 4 convs, %s (ratio: ours)" % what, ours["follow" + suffix],
               ref["follow" + suffix], "x", "ours <= 0.1", ratio=ours["follow" + suffix])
        print("%-58s ours %.0f%%, ref %.0f%% of the follow-ups' prompt tokens" % (
            "   cached prompt tokens reported", 100 * ours["cached" + suffix], 100 * ref["cached" + suffix]))
    report("g. 4 json_schema streams aggregate tokens/s (one grammar)", ours["json"], ref["json"], "tok/s",
           ">= 1.0")
    report("g. peak RSS (VmHWM), LLM_PARALLEL=4 vs -np 4", ours["rss4"], ref["rss4"], "MiB", "<= 1.1")


def agent_prompt(tools=24, rules=60):
    """An agent-sized system prompt (~5.5k SmolLM2 tokens): numbered working rules, then a JSON
    tool list, as a coding agent's instructions are; the same every call."""
    rnd = random.Random(7)
    verbs = ("read", "edit", "run", "search", "list", "check", "write", "move", "format", "explain")
    things = ("file", "test", "function", "module", "commit", "branch", "command", "log", "diff", "error")
    text = ["You are a coding agent working in the user's repository. Follow these rules."]
    for n in range(rules):
        text.append("Rule %d: before you %s a %s, %s the %s it touches and say why in one sentence." % (
            n + 1, rnd.choice(verbs), rnd.choice(things), rnd.choice(verbs), rnd.choice(things)))
    listed = [{"type": "function", "function": {
        "name": "%s_%s_%d" % (rnd.choice(verbs), rnd.choice(things), n),
        "description": "%s a %s of the repository, given its path and what to look for." % (
            rnd.choice(verbs).capitalize(), rnd.choice(things)),
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "the path, relative to the repository root"},
            "pattern": {"type": "string", "description": "what to look for, as a regular expression"},
            "limit": {"type": "integer", "description": "at most this many results"}},
            "required": ["path"]}}} for n in range(tools)]
    return "\n".join(text) + "\n\nTools:\n" + json.dumps(listed, indent=1)


def first_token(url, model, system, task, max_tokens=16):
    """(seconds to the first token, prompt tokens, cached prompt tokens) of one streamed chat."""
    body = dict(chat_body(model, task, system), max_tokens=max_tokens)
    started, first, _ended, usage, _text = _stream((url, body))
    return first - started, usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get(
        "cached_tokens", 0)


def beside_a_running_one(url, model, system):
    """(first session's first token, second session's first token): the second sent with the same
    system prompt as soon as the first's first token came, while the first still generates."""
    body = dict(chat_body(model, "Task A: list the files.", system), max_tokens=200, stream=True)
    started = time.perf_counter()
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith(b"data: {") and any(
                    (c.get("delta") or {}).get("content") for c in json.loads(line[6:])["choices"]):
                break
        first = time.perf_counter() - started
        second = first_token(url, model, system, "Task B: run the tests.")
        for _line in lines:  # the first session runs to its end
            pass
    return first, second


def restore_times(log_path):
    """(seconds reading and checking, seconds setting) of each restore the node logged."""
    found = re.findall(r"read and checked in ([\d.]+) s, set in ([\d.]+) s", Path(log_path).read_text())
    return [(float(read), float(set_)) for read, set_ in found]


def ours_round(work, env, system, i):
    """The node: cold, a second session beside the first, then a restart (keep-alive 0: unloaded
    after each request), its first request, then one after the unload. ("ours", figures)."""
    shutil.rmtree(Path(env["LLM_MODELS_DIR"]) / ".llmnode" / "kv", ignore_errors=True)  # a cold cache
    log_path = work / ("node-%d.log" % i)
    server = Served(env, log=log_path)
    try:
        if not wait_until_up(server.url, server.proc):
            print("the node did not start: prompt cache bench not run")
            return None
        _stream((server.url, chat_body(ENGINE_MODEL, "Hello")))  # loaded
        cold, (second, prompt_tokens, cached2) = beside_a_running_one(server.url, ENGINE_MODEL, system)
    finally:
        server.close()
    server = Served(dict(env, LLM_KEEP_ALIVE="0"), log=log_path)
    try:
        if not wait_until_up(server.url, server.proc):
            print("the node did not start again: prompt cache bench not run")
            return None
        restart, _, cached_restart = first_token(server.url, ENGINE_MODEL, system, "Task C: fix it.")
        unload, _, cached_unload = first_token(server.url, ENGINE_MODEL, system, "Task D: test it.")
    finally:
        server.close()
    restores = restore_times(log_path)
    return "ours", dict(cold=cold, second=second, restart=restart, unload=unload, prompt=prompt_tokens,
                        cached_second=cached2, cached_restart=cached_restart, cached_unload=cached_unload,
                        restore=(statistics.median(read + set_ for read, set_ in restores) if restores
                                 else float("nan")))


def ref_round(binary, gguf, n_ctx, threads, system):
    """llama-server (-np 2): cold, a second session beside the first, a restart. ("ref", figures)."""
    figures = {}
    for phase in ("run", "restart"):
        ref = LlamaServer(binary, gguf, 2, n_ctx, threads)
        try:
            if not wait_until_up(ref.url, ref.proc, path=ref.ready_path):
                print("llama-server did not start: prompt cache bench not run")
                return None
            if phase == "run":
                _stream((ref.url, chat_body(gguf, "Hello")))
                figures["cold"], (figures["second"], _, _) = beside_a_running_one(ref.url, gguf, system)
            else:
                figures["restart"] = first_token(ref.url, gguf, system, "Task C: fix it.")[0]
        finally:
            ref.close()
    return "ref", figures


def bench_prompt_cache(work, rounds, threads=2, n_ctx=8192):
    """Agent-sized prompts on SmolLM2 (2 sequences of 8k) against llama-server (-np 2): the cold
    first token; a second session with the same system prompt sent while the first generates; the
    first request after a restart, and after a keep-alive unload (the node: its prompt cache on
    disk); restoring a saved prefix against computing it; a q8_0 KV cache against f16."""
    from tests.conftest import smollm2_path
    from tests.fakeregistry import FakeRegistry
    from tests.test_engine import kv_bytes

    system = agent_prompt()
    print("\n== i. agent-sized prompts on SmolLM2: one system prompt, 2 sequences of %d tokens, %d threads"
          % (n_ctx, threads))
    binary = llama_server()
    gguf = smollm2_path()
    reg = FakeRegistry().start()
    got = {"ours": {}, "ref": {}}

    def note(side, figures):
        print("   %s: %s" % (side, ", ".join("%s %.3g" % item for item in sorted(figures.items()))),
              flush=True)
        for key, value in figures.items():
            got[side].setdefault(key, []).append(value)

    try:
        reg.add_model("library/smollm2", "135m", Path(gguf).read_bytes())
        models = work / "cache-models"
        env = {"LLM_MODELS_DIR": str(models), "LLM_REGISTRY_URL": reg.url, "LLM_CTX_SIZE": str(n_ctx),
               "LLM_PARALLEL": "2", "LLM_CPU_THREADS": str(threads)}
        subprocess.run([sys.executable, str(ROOT / "llmnode.py"), "pull", ENGINE_MODEL],
                       env=dict(os.environ, **env), check=True, capture_output=True)
        for i in range(rounds):
            sides = [lambda i=i: ours_round(work, env, system, i),
                     lambda: ref_round(binary, gguf, n_ctx, threads, system)]
            for side in sides[::-1] if i % 2 else sides:  # alternating which goes first
                figures = side()
                if figures is None:
                    return
                note(*figures)
        # Tokens/s of one stream: f16 KV, q8_0 KV, beside an operator's `verify` run again and
        # again, beside the node's own scrub every second; each on a fresh node, alternating.
        conditions = [("f16", {}, None), ("q8_0", {"LLM_KV_CACHE_TYPE": "q8_0"}, None),
                      ("verify", {}, verifying), ("scrub", {"LLM_SCRUB_INTERVAL_SECS": "1"}, None)]
        for i in range(rounds):
            for name, extra, beside in conditions[::-1] if i % 2 else conditions:
                server = Served(dict(env, LLM_PROMPT_CACHE_BYTES="0", **extra))
                try:
                    if not wait_until_up(server.url, server.proc):
                        print("the node did not start (%s): the stream rows not run" % name)
                        return
                    _stream((server.url, chat_body(ENGINE_MODEL, "Hello")))
                    with beside(env) if beside else contextlib.nullcontext():
                        note("ours", {"tps_" + name: one_stream(server.url, ENGINE_MODEL)})
                finally:
                    server.close()
    finally:
        reg.stop()
    llm = llmnode.load_llama(gguf, conf.load(environ={"LLM_CPU_THREADS": str(threads)}))
    try:
        kv_ratio = kv_bytes(llm, "q8_0") / kv_bytes(llm, "f16")
    finally:
        llm.close()
    ours, ref = ({key: statistics.median(values) for key, values in got[side].items()} for side in got)
    print("   prompt: %d tokens; cached: %d beside a running session, %d after a restart, %d after an unload"
          % (ours["prompt"], ours["cached_second"], ours["cached_restart"], ours["cached_unload"]))
    report("i. cold first token, agent prompt (2 x 8k)", ours["cold"], ref["cold"], "s", "<= 1.0")
    for key, what in (("second", "a 2nd session beside the 1st"), ("restart", "1st request after a restart")):
        report("i. %s, 1st token / cold (ratio: ours)" % what, ours[key] / ours["cold"],
               ref[key] / ref["cold"], "x", "ours <= 0.1", ratio=ours[key] / ours["cold"])
    report_alone("i. 1st request after a keep-alive unload, 1st token / cold", ours["unload"] / ours["cold"],
                 "x", "<= 0.1")
    report_alone("i. restoring the saved prefix (read + sha256 + set) / cold", ours["restore"] / ours["cold"],
                 "x", "<= 0.1")
    report_alone("i. KV bytes q8_0 / f16 (llama.cpp's state size)", kv_ratio, "x", "~ 0.5")
    report("i. one stream tokens/s, q8_0 KV vs f16", ours["tps_q8_0"], ours["tps_f16"], "tok/s", ">= 0.9")
    report("i. one stream tokens/s beside `llmnode.py verify` vs idle", ours["tps_verify"], ours["tps_f16"],
           "tok/s", ">= 0.8")
    report("i. one stream tokens/s beside a scrub every second vs idle", ours["tps_scrub"], ours["tps_f16"],
           "tok/s", ">= 0.8")


@contextlib.contextmanager
def verifying(env):
    """`python llmnode.py verify` of the store, again and again until the block ends."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            subprocess.run([sys.executable, str(ROOT / "llmnode.py"), "verify"], env=dict(os.environ, **env),
                           capture_output=True)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def bench_retrieval(work, rounds, threads=2):
    """Embeddings of 1k-token inputs on SmolLM2 and a rerank of 32 short documents on the tiny
    reranker, against llama-server (`--embeddings --pooling mean`, the mean over the tokens the
    node gives a chat model; `--reranking`): both sides up at once, measured in turn."""
    from tests.conftest import smollm2_path

    print("\n== h. retrieval vs llama-server: 1k-token embeddings on SmolLM2, rerank of 32 documents "
          "on the tiny reranker, %d threads" % threads)
    binary = llama_server()
    smol = smollm2_path()
    reranker = write_tiny_gguf(work / "reranker.gguf", seed=3, reranker=True)
    store = store_with(work / "retrieval-store", "smol:1", smol)
    store_with(work / "retrieval-store", "reranker:1", reranker)
    ours = Served({"LLM_MODELS_DIR": store.root, "LLM_CPU_THREADS": str(threads),
                   "LLM_EMBED_CTX_SIZE": "2048"})
    refs = []
    for gguf, extra in ((smol, ["--embeddings", "--pooling", "mean", "-c", "2048", "-b", "2048",
                                "-ub", "2048"]),
                        (str(reranker), ["--reranking", "-c", "2048", "-ub", "512"])):
        port = free_port()
        refs.append(("http://127.0.0.1:%d" % port, subprocess.Popen(
            [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
             "-tb", str(threads)] + extra + (["--no-repack"] if llmnode.cpu_has_amx() else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 70)
    topics = STORY_TOPICS + CITIES
    documents = ["Notes %d on %s, and what it tells us." % (i, topics[i % len(topics)]) for i in range(32)]
    cases = [("h. embeddings of 1k-token inputs: throughput", "/v1/embeddings",
              {"model": "smol:1", "input": text}, refs[0][0], smol),
             ("h. rerank of 32 short documents: latency", "/v1/rerank",
              {"model": "reranker:1", "query": "a lighthouse keeper", "documents": documents}, refs[1][0],
              str(reranker))]
    try:
        if not wait_until_up(ours.url, ours.proc) or not all(
                wait_until_up(url, proc, path="/health") for url, proc in refs):
            print("a server did not start: retrieval comparison not run")
            return
        for name, path, body, ref_url, gguf in cases:
            ref_body = dict(body, model=gguf)
            load(ours.url, None, 0, 1, 2, body=body, path=path)  # loads the model, makes its context
            load(ref_url, None, 0, 1, 2, body=ref_body, path=path)
            a, b = [], []
            for _ in range(rounds):
                a.append(load(ours.url, None, 0, 2, 5, body=body, path=path))
                b.append(load(ref_url, None, 0, 2, 5, body=ref_body, path=path))
            if path == "/v1/embeddings":
                ours_rps, ref_rps = (statistics.median(r[0] for r in rows) for rows in (a, b))
                report(name + ", ref llama-server", ours_rps, ref_rps, "rps", ">= 1.0")
            else:
                ours_p50, ref_p50 = (statistics.median(r[1] for r in rows) for rows in (a, b))
                report(name + " p50, ref llama-server", ours_p50, ref_p50, "s", "<= 1.0")
    finally:
        for _url, proc in refs:
            proc.terminate()
            proc.wait(timeout=10)
        ours.close()


AGENT_TASK = "List the files in this directory."


def report_alone(name, value, unit, aim):
    """A figure with no reference side: printed, and listed in the summary as it is."""
    ROWS.append((name, value, value, unit, value, aim))
    print("%-58s ours %9.3f %-4s (aim %s)" % (name, value, unit, aim), flush=True)


def bench_agents(work, tiny=False, n_ctx=32768, threads=2):
    """Claude Code and Codex (`tox -e agents` installs them), one task each on a fresh node serving
    SmolLM2 with a context for their 8-15k-token prompts: the task's wall time, and the share of
    the prompt tokens the node read from its prompt cache (its own usage, as the agent reports
    it) in the task's turns after the first and in a second task. `tiny`: the tests' brief
    random model instead, a smoke check of this code in a minute."""
    from tests.agentrun import claude_result, codex_usage, run_claude, run_codex
    from tests.conftest import smollm2_path
    from tests.fakeregistry import FakeRegistry
    from tests.tinymodel import BRIEF, write_tiny_bpe_gguf

    gguf = smollm2_path()
    if tiny:
        gguf = write_tiny_bpe_gguf(work / "tiny-bpe.gguf", source=gguf, favoured=BRIEF)
    print("\n== h. coding agents on %s: %r, LLM_CTX_SIZE=%d, LLM_PARALLEL=1, %d threads"
          % ("the tiny model (smoke)" if tiny else "SmolLM2", AGENT_TASK, n_ctx, threads))

    def claude(url, root):
        run = run_claude(url, ENGINE_MODEL, root, AGENT_TASK, timeout=1800)
        usage = claude_result(run)["usage"]
        return run, usage["cache_read_input_tokens"], usage["input_tokens"] + usage["cache_read_input_tokens"]

    def codex(url, root):
        run = run_codex(url, ENGINE_MODEL, root, AGENT_TASK, timeout=1800, args=("--json",))
        usage = codex_usage(run)
        return run, usage.get("cached_input_tokens", 0), usage.get("input_tokens", 0)

    reg = FakeRegistry().start()
    try:
        reg.add_model("library/smollm2", "135m", Path(gguf).read_bytes())
        env = {"LLM_MODELS_DIR": str(work / "agents-models"), "LLM_REGISTRY_URL": reg.url,
               "LLM_CTX_SIZE": str(n_ctx), "LLM_PARALLEL": "1", "LLM_CPU_THREADS": str(threads)}
        subprocess.run([sys.executable, str(ROOT / "llmnode.py"), "pull", ENGINE_MODEL],
                       env=dict(os.environ, **env), check=True, capture_output=True)
        for agent, task in (("Claude Code", claude), ("Codex", codex)):
            server = Served(env)  # a fresh node: the first task starts with an empty cache
            try:
                if not wait_until_up(server.url, server.proc):
                    print("the node did not start: agents not run")
                    return
                # Both tasks in one working directory and HOME, as a user's next task runs.
                first, cached, prompt = task(server.url, str(work / agent))
                if first.returncode != 0:
                    print("%s failed: %r" % (agent, first))
                    return
                second, cached2, prompt2 = task(server.url, str(work / agent))
            finally:
                server.close()
            report_alone("h. %s: one task, wall time" % agent, first.seconds, "s", "-")
            # On a cold node the first request reads nothing from the cache: what the task read
            # came in its later turns.
            report_alone("h. %s: cached share of prompt tokens, one task" % agent,
                         100 * cached / max(prompt, 1), "%", "-")
            report_alone("h. %s: cached share of prompt tokens, 2nd task" % agent,
                         100 * cached2 / max(prompt2, 1), "%", ">= 50")
    finally:
        reg.stop()


def human(n):
    return "%.0f MiB" % (n / (1 << 20)) if n < 1 << 30 else "%.1f GiB" % (n / (1 << 30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big blob")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per comparison")
    parts = ["verify", "repair", "serving", "load", "api", "engine", "cache", "retrieval", "agents"]
    parser.add_argument("--only", choices=parts, action="append", help="run only these parts (repeatable)")
    parser.add_argument("--agents-tiny", action="store_true",
                        help="agents on the tests' tiny model instead of SmolLM2 (a smoke check)")
    args = parser.parse_args(argv)
    only = set(args.only or parts)
    work = Path(tempfile.mkdtemp(prefix="llmnode-bench-", dir=os.environ.get("BENCH_DIR")))
    print("llmnode benchmark: %d cores, blob %d MiB, %d rounds, work dir %s"
          % (os.cpu_count(), args.size_mib, args.rounds, work))
    try:
        blob = str(work / "blob")
        size = args.size_mib << 20
        digest = make_blob(blob, size) if only & {"verify", "repair"} else None
        if "verify" in only:
            bench_verify(blob, args.rounds)
        if "repair" in only:
            bench_repair(blob, digest, size, work, args.rounds)
        served = {"serving": bench_serving, "load": bench_load, "api": bench_api, "engine": bench_engine,
                  "cache": bench_prompt_cache, "retrieval": bench_retrieval}
        for part, bench in served.items():  # each against a served node, in this order
            if part in only:
                bench(work, args.rounds)
        if "agents" in only:
            bench_agents(work, tiny=args.agents_tiny)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n== summary (ratio: ours / reference unless noted)")
    for name, _ours, _theirs, _unit, ratio, aim in ROWS:
        print("%-58s %8.3f   aim %s" % (name, ratio, aim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
