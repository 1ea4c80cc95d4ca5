"""The engine under faults and departures: an exception in one step fails only that step's
request, a client that leaves frees its sequence, requests are served in arrival order; on
SmolLM2 and the tiny model through a real waitress server in this process."""

import json
import os
import socket
import threading
import time

import pytest
import requests

import llmnode
from repair import hashing, operations
from tests.conftest import Served, blob_of, served_node, settings_for, wait_for
from tests.fakeregistry import FakeRegistry
from tests.test_hashing import Engine

SMOL = "smollm2:135m"
TINY = "gpt-oss:7b"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# A request asking for this many tokens meets the armed fault (see `Faults`).
DOOMED_MAX_TOKENS = 7


class Faults:
    """The node's step hook: raises once per arming, in the sampling of an answer whose
    request asked for DOOMED_MAX_TOKENS tokens; `observe(task)`, if set, sees every answer
    about to be sampled."""

    def __init__(self):
        # Guards armed (faults still to raise), read by the compute thread.
        self._lock = threading.Lock()
        self.armed = 0
        self.observe = None

    def arm(self):
        with self._lock:
            self.armed += 1

    def __call__(self, task):
        if self.observe is not None:
            self.observe(task)
        with self._lock:
            if not self.armed or task.gen.max_tokens != DOOMED_MAX_TOKENS:
                return
            self.armed -= 1
        raise RuntimeError("a fault injected into this step")


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2, tiny_gguf):
    faults = Faults()
    with served_node(tmp_path_factory, "faults", {SMOL: smollm2, TINY: tiny_gguf}, threads=8,
                     options={"step_hook": faults}, LLM_CTX_SIZE="2048", LLM_CPU_THREADS="2",
                     LLM_MAX_LOADED_MODELS="2", LLM_PARALLEL="2") as s:
        s.faults = faults
        yield s


def slots_of(served, model=SMOL):
    """The model's Slots (loaded by a one-token request if it is not in memory)."""
    assert chat(served, model, "Hi", max_tokens=1).status_code == 200
    return served.node.pool.entry(blob_of(served.models_dir, tuple(model.split(":")))[1]).llm.slots


def chat(served, model, content, **kw):
    return requests.post(served.url + "/v1/chat/completions", timeout=120, json=dict(
        {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0}, **kw))


def open_stream(served, model, content, **kw):
    """A streamed chat's response, its first content chunk read."""
    r = requests.post(served.url + "/v1/chat/completions", timeout=120, stream=True, json=dict(
        {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
         "stream": True}, **kw))
    assert r.status_code == 200, r.text
    lines = r.iter_lines()
    for line in lines:
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    return r, lines


def finish_of(lines):
    """The finish reason the rest of a stream ends with."""
    reason = None
    for line in lines:
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                reason = choice.get("finish_reason") or reason
    return reason


def raw_post(served, body):
    """A chat request on a socket of the test's own (closing it is a client leaving)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", served.server.effective_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


# -- faults ------------------------------------------------------------------------------------------

def test_an_exception_in_one_step_fails_that_request_alone_and_the_engine_goes_on(served, caplog):
    for model in (TINY, SMOL):
        assert chat(served, model, "Hello", max_tokens=2).status_code == 200  # both loaded
    stream, lines = open_stream(served, SMOL, "Count to a thousand.", max_tokens=300)
    try:
        for model in (TINY, SMOL):  # another model, then the streaming one
            served.faults.arm()
            failed = chat(served, model, "Hello", max_tokens=DOOMED_MAX_TOKENS)
            assert failed.status_code == 500, failed.text
            assert failed.json()["error"]["code"] == "engine_fault"
            assert "a fault injected into this step" in caplog.text  # with its traceback
            after = chat(served, model, "Hello", max_tokens=DOOMED_MAX_TOKENS)
            assert after.status_code == 200, after.text
            assert after.json()["choices"][0]["message"]["content"]
        # The stream was still running through both faults, and ends as an answer does.
        assert any(t is not None for t in slots_of(served).busy)
        assert finish_of(lines) in ("stop", "length")
    finally:
        stream.close()


def test_the_stores_hashing_holds_to_one_core_while_a_stream_runs_and_not_after(served, tmp_path):
    slots_of(served)
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(2 * hashing.BLOCK))
    allowed = os.sched_getaffinity(0)
    observer = Engine()  # never busy itself: it notes what the node's engine made the hashing thread
    hashing.register_engine(observer)
    try:
        stream, lines = open_stream(served, SMOL, "Count to a thousand.", max_tokens=300)
        try:
            assert served.node.compute.busy()
            hashing.sha256_file(blob)
        finally:
            stream.close()
        assert [cores for cores, _nice in observer.seen][1:] == [{max(allowed)}] * 2
        wait_for(lambda: not served.node.compute.busy(), "the engine to be idle")
        observer.seen.clear()
        hashing.sha256_file(blob)
        assert [cores for cores, _nice in observer.seen] == [allowed] * 3
    finally:
        hashing._engines.discard(observer)


def test_a_failing_job_on_the_compute_thread_leaves_it_running():
    engine = llmnode.ComputeThread()

    def explode():
        raise RuntimeError("a job that fails")

    engine.post(explode)
    assert engine.run(lambda: 42) == 42


class FailingStep:
    """What the compute thread steps (a model's Slots, as far as it is concerned) whose step
    raises once."""

    def __init__(self):
        self.faults, self.steps = [], 0

    def step(self):
        self.steps += 1
        if self.steps == 1:
            raise RuntimeError("a fault outside any one answer")
        return False

    def fault(self, error):
        self.faults.append(error)

    def has_work(self):
        return self.steps < 2


def test_a_step_that_raises_fails_its_answers_and_the_thread_steps_on():
    engine = llmnode.ComputeThread()
    failing = FailingStep()
    engine.wake(failing)
    wait_for(lambda: failing.steps >= 2, "the thread to step on after the fault")
    assert [str(e) for e in failing.faults] == ["a fault outside any one answer"]
    assert engine.run(lambda: "alive") == "alive"


# -- clients that leave ------------------------------------------------------------------------------

# How long a stopped answer may take to free its sequence: the request thread's poll and a
# step, with room for a loaded machine; an answer nobody stops runs 1000 tokens, far longer.
FREED_WITHIN_SECS = 10


def leaves_and_frees(served, body):
    """Send `body` on a socket, wait until its answer generates, close the socket: the answer
    is stopped (its sequence free, nothing queued) long before its budget of 1000 tokens."""
    slots = slots_of(served)
    sock = raw_post(served, body)
    try:
        wait_for(lambda: any(t is not None and t.generated > 2 for t in slots.busy),
                 "the request to reach the engine", timeout=60)
        task = next(t for t in slots.busy if t is not None)
    finally:
        sock.close()
    wait_for(lambda: not any(slots.busy) and not slots._waiting, "its sequence to be free",
             timeout=FREED_WITHIN_SECS)
    assert task.state is llmnode.TaskState.DONE and task.generated < body["max_tokens"]


def test_an_unstreamed_client_that_leaves_frees_its_sequence(served):
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 1000, "temperature": 0}
    leaves_and_frees(served, body)


def test_a_tool_call_stream_whose_client_leaves_frees_its_sequence(served):
    # Held for its tool calls, this stream writes nothing the client could fail to read.
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "tools": [WEATHER], "tool_choice": "auto", "stream": True, "max_tokens": 1000,
            "temperature": 0}
    leaves_and_frees(served, body)


def test_a_queued_client_that_leaves_is_dropped_from_the_queue(served):
    slots = slots_of(served)
    # Both sequences taken by one request of two answers.
    stream, lines = open_stream(served, SMOL, "Count to a thousand.", max_tokens=1000, n=2)
    try:
        queued = {"model": SMOL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        sock = raw_post(served, queued)
        try:
            wait_for(lambda: slots._waiting, "the request to queue")
        finally:
            sock.close()
        wait_for(lambda: not slots._waiting, "the queue to be empty", timeout=FREED_WITHIN_SECS)
        assert sum(t is not None for t in slots.busy) == 2  # the stream runs on
    finally:
        stream.close()
    wait_for(lambda: not any(slots.busy), "the stream's sequences to be free")


# -- arrival order -----------------------------------------------------------------------------------

def start(served, content, **kw):
    """A chat started in this process: its Answer (its EngineRun's tasks hold the engine's view)."""
    req = llmnode.validate_chat(dict({"model": SMOL, "temperature": 0, "max_tokens": 4,
                                      "messages": [{"role": "user", "content": content}]}, **kw),
                                served.node.settings.n_ctx)
    return served.node.chat(req)


def first_task(answer):
    return answer._run.groups[0][0]


def test_the_long_prompt_that_arrived_first_is_read_first(served):
    slots = slots_of(served)
    wait_for(lambda: not any(slots.busy), "the engine to be idle")
    if slots.used[0] < slots.used[1]:
        # The next request takes the least recently used sequence: make that sequence 1, so
        # that index order (sequence 0 first) and arrival order disagree.
        start(served, "Say one word.", max_tokens=1).collect()
    words = " ".join("word%d" % i for i in range(200))  # ~1,000 tokens: 2 chunks each
    first = start(served, "A: " + words)
    wait_for(lambda: first_task(first).state is llmnode.TaskState.PROMPT, "the first to start")
    assert first_task(first).seq == 1
    second = start(served, "B: " + words)
    left = []  # B's prompt tokens still unread when A is first sampled

    def observe(task):
        if task is first_task(first) and not left:
            left.append(len(first_task(second).todo))

    served.faults.observe = observe
    try:
        first.collect()
        second.collect()
    finally:
        served.faults.observe = None
    assert left[0] > 0


def test_a_request_for_every_sequence_does_not_hold_back_one_that_fits(served):
    slots = slots_of(served)
    running = start(served, "Count to a thousand.", max_tokens=1000, stream=True)
    wait_for(lambda: first_task(running).state is llmnode.TaskState.GENERATING, "the first to run")
    wide = start(served, "Name a fruit.", n=2)  # waits for both sequences
    try:
        wait_for(lambda: slots._waiting, "the wide request to queue")
        r = chat(served, SMOL, "Hi", max_tokens=4)
        assert r.status_code == 200, r.text
        assert first_task(running).state is llmnode.TaskState.GENERATING
        assert first_task(wide).state is llmnode.TaskState.QUEUED
    finally:
        running.close()
    ended, _ = wide.collect()
    assert sorted(ended) == [0, 1]


def test_time_in_the_queue_is_not_counted_as_reading_the_prompt(served):
    slots = slots_of(served)
    both = start(served, "Count to a thousand.", max_tokens=60, n=2)  # both sequences, ~2 s
    wait_for(lambda: first_task(both).state is llmnode.TaskState.GENERATING, "both to run")
    queued = start(served, "Hi")
    wait_for(lambda: slots._waiting, "the request to queue")
    both.collect()
    queued.collect()
    assert queued.timings["queue"] > 0.3
    assert queued.timings["prompt_eval"] < queued.timings["queue"]


def test_a_cache_key_keeps_a_conversation_on_its_own_sequence(served):
    slots_of(served)

    def turn(system, question, key):
        req = llmnode.validate_chat({"model": SMOL, "temperature": 0, "max_tokens": 2,
                                     "prompt_cache_key": key,
                                     "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": question}]},
                                    served.node.settings.n_ctx)
        answer = served.node.chat(req)
        answer.collect()
        return answer.usage

    mine, other = ("Conversation %s. " % k + "Answer briefly and kindly. " * 40 for k in "AB")
    turn(mine, "Hi", "mine")
    turn(other, "Hi", "other")
    turn(mine, "Hi", "mine")  # the other conversation's sequence is now the least recently used
    # The same client starts over (nothing shared): its own sequence, not the other's cache.
    turn("Start again.", "Hi", "mine")
    usage = turn(other, "Hi", "other")
    assert usage.cached_tokens == usage.prompt_tokens - 1


# -- a load beside a stream ----------------------------------------------------------------------------

def test_a_model_load_does_not_stop_another_models_stream(tmp_path, smollm2, tiny_gguf):
    reg = FakeRegistry().start()
    reg.add_model("library/smollm2", "135m", smollm2)
    reg.add_model("library/gpt-oss", "7b", tiny_gguf)
    settings = settings_for(str(tmp_path / "models"), reg.url, LLM_CTX_SIZE="2048",
                            LLM_MAX_LOADED_MODELS="2", LLM_VERIFY_ON_LOAD="false")
    streaming, window, sampled = threading.Event(), [], []

    def loader(path, gpu_layers):
        if os.path.basename(path) == os.path.basename(smol_path):
            assert streaming.wait(60), "the other model's stream never started"
            window.append(time.monotonic())
            try:
                return llmnode.load_llama(path, settings, gpu_layers)
            finally:
                window.append(time.monotonic())
        return llmnode.load_llama(path, settings, gpu_layers)

    def hook(task):  # the tiny model's tokens, as the engine samples them
        sampled.append(time.monotonic())
        if len(sampled) == 20:
            streaming.set()

    node = llmnode.Node(settings, loader=loader, step_hook=hook)
    for name in (SMOL, TINY):
        operations.pull(node.repairs, llmnode.names.parse(name))
    smol_path = blob_of(str(tmp_path / "models"), ("smollm2", "135m"))[1]
    s = Served(node)
    try:
        assert chat(s, TINY, "x", max_tokens=1).status_code == 200  # in memory before
        # The tiny model streams ~2000 tokens (end-of-text barred) while SmolLM2 loads.
        stream = threading.Thread(target=lambda: chat(s, TINY, "x", max_tokens=2000, logit_bias={"2": -100}))
        stream.start()
        assert chat(s, SMOL, "Hi", max_tokens=2).status_code == 200
        stream.join(120)
    finally:
        s.close()
        reg.stop()
    start, end = window
    assert sum(start < t < end for t in sampled) > 0
