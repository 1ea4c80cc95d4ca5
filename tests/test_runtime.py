"""The runtime: every load verified (on the real model), the model pool (the loaded-model limit,
sharing, keep-alive, the least recently used model out first), the model lock's arrival order,
preload and readiness, and the compute thread every load and generation runs on."""

import re
import threading

import pytest
import requests

import conf
import llmnode
from tests.conftest import blob_of, intact, node_env, rot, run_cli, wait_for
from tests.tinymodel import write_tiny_gguf

SMOL = "smollm2:135m"
QUESTION = {"model": SMOL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 16, "seed": 0}


@pytest.fixture
def smol_store(registry, smollm2, models_dir):
    """A store with the real model (and the tiny one) pulled from the loopback registry."""
    registry.add_model("library/smollm2", "135m", smollm2)
    env = node_env(models_dir, registry.url, LLM_CTX_SIZE="1024", LLM_CPU_THREADS="2")
    for name in (SMOL, "gpt-oss:7b"):
        result = run_cli("pull", name, env=env)
        assert result.returncode == 0, result.stderr
    return env


def ask(node, body=QUESTION):
    r = requests.post(node.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def assert_repair_logged(log):
    lines = [line for line in log.splitlines() if "auto-repair" in line.lower()]
    assert lines, log[-3000:]
    assert lines[0] == "[INFO] Starting auto-repair for model: %s" % SMOL, log[-3000:]
    assert lines[-1].startswith("[INFO] Auto-repair completed: %s (elapsed: " % SMOL)


def test_bit_rot_across_a_restart_is_repaired_before_the_real_model_answers(smol_store, models_dir,
                                                                             start_node):
    node = start_node(smol_store)
    answer = ask(node)
    node.stop()
    layer, blob = blob_of(models_dir, ("smollm2", "135m"))
    rot(blob, n=4 << 20)
    # The rotten weights load and answer differently: only a digest check tells.
    unchecked = start_node(dict(smol_store, LLM_VERIFY_ON_LOAD="false"))
    assert ask(unchecked) != answer
    unchecked.stop()
    again = start_node(smol_store)
    assert ask(again) == answer
    assert intact(blob, layer)
    assert_repair_logged(again.log())
    print("answer before and after the rot and repair: %r" % answer)


def test_bit_rot_across_an_eviction_is_repaired_before_the_real_model_answers(smol_store, models_dir,
                                                                               start_node):
    node = start_node(dict(smol_store, LLM_MAX_LOADED_MODELS="1"))
    answer = ask(node)
    ask(node, {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert "unloading model sha256-" in node.log()  # the real model left memory
    layer, blob = blob_of(models_dir, ("smollm2", "135m"))
    rot(blob, n=4 << 20)
    assert ask(node) == answer
    assert intact(blob, layer)
    assert_repair_logged(node.log())


def test_the_load_and_the_verification_run_alongside(smol_store, models_dir, start_node):
    node = start_node(smol_store)
    ask(node)
    line = next(x for x in node.log().splitlines() if "model %s: loaded in" % SMOL in x)
    load, verify = [float(v) for v in
                    re.search(r"loaded in ([\d.]+)s, blob verified in ([\d.]+)s", line).groups()]
    print("first load: %.2fs loading, %.2fs verifying, on two threads" % (load, verify))
    assert "llmnode_verified_loads_total 1" in requests.get(node.url + "/metrics", timeout=5).text


# -- the pool: a fake loader is a parameter, so these need no llama.cpp --------------------------

class FakeLlm:
    live = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, name, log):
        self.name, self.log = name, log
        with FakeLlm.lock:
            FakeLlm.live += 1
            FakeLlm.most = max(FakeLlm.most, FakeLlm.live)
        log.append(("load", name))
        self.closed = threading.Event()
        self.metadata = {}

    def close(self):
        with FakeLlm.lock:
            FakeLlm.live -= 1
        self.log.append(("close", self.name))
        self.closed.set()


@pytest.fixture
def fakes():
    FakeLlm.live = FakeLlm.most = 0
    return []


def test_never_more_models_in_memory_than_the_limit(fakes):
    pool = llmnode.ModelPool(capacity=1)
    held = pool.acquire("a", lambda: FakeLlm("a", fakes))
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire("b", lambda: FakeLlm("b", fakes))))
    t.start()
    wait_for(lambda: pool.loaded() == [], "b marks a to leave memory")
    assert t.is_alive() and FakeLlm.live == 1  # b waits for a's generation, not beside it
    held.release()
    t.join(30)
    got[0].release()
    assert fakes == [("load", "a"), ("close", "a"), ("load", "b")]
    assert FakeLlm.most == 1 and pool.live() == 1


def test_an_eviction_waits_with_a_deadline(fakes):
    pool = llmnode.ModelPool(capacity=1)
    held = pool.acquire("a", lambda: FakeLlm("a", fakes))
    with pytest.raises(llmnode.ModelBusy):
        pool.acquire("b", lambda: FakeLlm("b", fakes), wait=0.2)
    held.release()
    assert pool.live() == 0 and pool.loaded() == []
    pool.acquire("b", lambda: FakeLlm("b", fakes), wait=5).release()
    assert FakeLlm.most == 1


def test_requests_share_a_loaded_model_and_a_load_waits_only_for_those_running(fakes):
    pool = llmnode.ModelPool(capacity=1)
    held = [pool.acquire("a", lambda: FakeLlm("a", fakes)) for _ in range(4)]
    assert fakes == [("load", "a")] and len({id(h) for h in held}) == 1  # one model, four users
    got = []
    other = threading.Thread(target=lambda: got.append(pool.acquire("b", lambda: FakeLlm("b", fakes))))
    other.start()
    wait_for(lambda: not pool.loaded(), "b to mark a as leaving memory")
    for h in held[:3]:
        h.release()
    assert not got and FakeLlm.live == 1  # one request still runs on a: b waits for it
    held[3].release()
    other.join(30)
    got[0].release()
    assert fakes == [("load", "a"), ("close", "a"), ("load", "b")] and FakeLlm.most == 1


def test_keep_alive_zero_unloads_after_the_request_and_minus_one_keeps(fakes):
    pool = llmnode.ModelPool(capacity=2, keep_alive=0.0)
    entry = pool.acquire("a", lambda: FakeLlm("a", fakes))
    llm = entry.llm
    entry.release()
    assert llm.closed.is_set() and pool.loaded() == []
    forever = pool.acquire("b", lambda: FakeLlm("b", fakes), keep_alive=None)
    forever.release()
    assert pool.loaded() == ["b"]


class GpuLlm(FakeLlm):
    """A fake model loaded with `layers` of its 10 on a GPU (as load_llama says it)."""

    def __init__(self, name, log, layers):
        super().__init__(name, log)
        self.gpu_max = 10
        self.gpu_layers = self.gpu_max if layers is None or layers < 0 else min(layers, self.gpu_max)


def test_num_gpu_loads_a_model_again_only_for_other_offloaded_layers_and_keeps_a_preload(fakes):
    pool = llmnode.ModelPool(capacity=1)

    def use(layers):
        entry = pool.acquire("a", lambda: GpuLlm("a", fakes, layers), gpu_layers=layers)
        entry.release()
        return entry.llm

    first = use(None)  # the node's setting: all 10
    pool.pin("a")  # preloaded
    assert use(-1) is first and use(10) is first and use(12) is first  # all 10 each time
    assert use(None) is first  # not asked: as loaded
    held = pool.acquire("a", lambda: GpuLlm("a", fakes, None))  # an answer still running on it
    got = []
    t = threading.Thread(target=lambda: got.append(use(3)))
    t.start()
    wait_for(lambda: pool.entry("a") is None, "the 10-layer copy to be marked to leave")
    assert t.is_alive() and not first.closed.is_set()  # it waits for the running answer
    held.release()
    t.join(30)
    assert first.closed.is_set() and got[0].gpu_layers == 3 and use(3) is got[0]
    assert fakes == [("load", "a"), ("close", "a"), ("load", "a")]
    assert pool.entry("a").pinned  # still preloaded: never unloaded for being idle


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_an_idle_model_leaves_after_its_keep_alive(fakes):
    clock = FakeClock()
    pool = llmnode.ModelPool(capacity=2, keep_alive=300.0, clock=clock)
    entry = pool.acquire("a", lambda: FakeLlm("a", fakes))
    llm = entry.llm
    entry.release()
    clock.now = 299.0
    pool.acquire("b", lambda: FakeLlm("b", fakes)).release()  # a release wakes the reaper
    assert pool.loaded() == ["a", "b"] and not llm.closed.is_set()
    clock.now = 300.0
    pool.acquire("b", lambda: FakeLlm("b", fakes)).release()
    assert llm.closed.wait(10)
    assert pool.loaded() == ["b"] and pool.live() == 1
    again = pool.acquire("a", lambda: FakeLlm("a", fakes))
    again.release()
    assert fakes.count(("load", "a")) == 2


# -- the pool on real (tiny) models ---------------------------------------------------------------

def test_least_recently_used_model_leaves_first(tmp_path):
    paths = [str(write_tiny_gguf(tmp_path / ("m%d.gguf" % i), seed=i)) for i in range(3)]
    loads = []

    def loader(path):
        loads.append(path)
        return llmnode.load_llama(path, conf.load(environ={"LLM_CTX_SIZE": "256",
                                                           "LLM_CPU_THREADS": "1"}))

    pool = llmnode.ModelPool(capacity=2)
    for p in (paths[0], paths[1], paths[0], paths[2]):
        pool.acquire(p, lambda p=p: loader(p)).release()
    assert sorted(pool.loaded()) == sorted([paths[0], paths[2]])
    assert loads == [paths[0], paths[1], paths[2]]


# -- the model lock: waiters served in arrival order ----------------------------------------------

def test_the_model_lock_is_handed_over_in_arrival_order():
    lock = llmnode.FairLock()
    assert lock.acquire()
    order = []

    def waiter(name):
        assert lock.acquire(timeout=30)
        order.append(name)
        lock.release()

    threads = []
    for i, name in enumerate("abcde"):
        t = threading.Thread(target=waiter, args=(name,))
        t.start()
        threads.append(t)
        # The next thread starts only once this one is queued.
        wait_for(lambda i=i: lock.waiting() == i + 1, "waiter %s queued" % name, timeout=10)
    lock.release()
    for t in threads:
        t.join(30)
    assert order == list("abcde")
    assert lock.acquire(timeout=0)  # free again once everyone has been


def test_a_timed_out_waiter_leaves_the_queue():
    lock = llmnode.FairLock()
    lock.acquire()
    assert not lock.acquire(timeout=0.01)
    assert lock.waiting() == 0
    lock.release()
    assert lock.acquire(timeout=0)


# -- preload and readiness ------------------------------------------------------------------------

def test_ready_waits_for_the_preloaded_models_and_health_does_not(pulled, registry, start_node):
    layer, blob = blob_of(pulled)
    with open(blob, "wb") as f:
        f.write(b"corrupted\n")
    registry.gate = threading.Event()
    node = start_node(node_env(pulled, registry.url, LLM_PRELOAD="gpt-oss:7b"))
    try:
        ready = requests.get(node.url + "/ready", timeout=5)
        assert ready.status_code == 503 and "gpt-oss:7b" in ready.json()["preload"]
        assert requests.get(node.url + "/health", timeout=5).status_code == 200
    finally:
        registry.gate.set()
    wait_for(lambda: requests.get(node.url + "/ready", timeout=5).status_code == 200, "the node ready",
             timeout=60)
    assert "preloaded model gpt-oss:7b" in node.log()
    assert "Auto-repair completed: gpt-oss:7b" in node.log()


def test_a_node_without_preload_is_ready_at_once(serve):
    assert requests.get(serve().url + "/ready", timeout=5).status_code == 200


# -- the compute thread: one OpenMP team for the whole process -----------------------------------

def test_compute_jobs_run_on_one_thread_whatever_thread_asks():
    compute = llmnode.ComputeThread()
    seen = []
    callers = [threading.Thread(target=lambda: seen.append(compute.run(threading.get_ident)))
               for _ in range(5)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(30)
    assert len(seen) == 5 and len(set(seen)) == 1 and seen[0] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)
    assert compute.run(lambda: "still serving") == "still serving"


def test_the_node_loads_on_the_load_thread_and_generates_on_the_compute_thread(pulled, registry):
    from tests.conftest import Served, settings_for
    settings = settings_for(pulled, registry.url)
    threads = []

    def loader(path, gpu_layers):
        threads.append(("load", threading.current_thread().name))
        return llmnode.load_llama(path, settings, gpu_layers)

    def step_hook(task):  # runs in the engine's step, after its decode, before each sampling
        threads.append(("step", threading.current_thread().name))

    s = Served(llmnode.Node(settings, loader=loader, step_hook=step_hook))
    try:
        body = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for stream in (False, False, True, False):
            assert s.post("/v1/chat/completions", dict(body, stream=stream)).status_code == 200
    finally:
        s.close()
    assert threads[0] == ("load", "llama-load") and len(threads) >= 4
    assert set(threads[1:]) == {("step", "llama-compute")}
