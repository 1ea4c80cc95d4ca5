"""Ollama's API through the official `ollama` client against a real node process: the real
model (SmolLM2) and the tiny one, an Ollama-written store read as is, repair under /api/chat."""

import hashlib
import json
import os
import subprocess
import threading

import ollama
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repair.records import StoreRecords
from tests.conftest import NodeProcess, bodies, node_env, run_cli, tree, weights
from tests.fakeregistry import FakeRegistry, digest_of
from tests.tinymodel import write_tiny_gguf

SMOL = "smollm2:135m"
TINY = "gpt-oss:7b"
STYLED = "styled:1"  # the tiny model with Ollama's template, params, system and license layers
PARAMS = {"num_predict": 3, "stop": ["<|end|>"], "temperature": 0.2}
LAYERS = [("application/vnd.ollama.image.template", b"{{ .System }} {{ .Prompt }}"),
          ("application/vnd.ollama.image.params", json.dumps(PARAMS).encode()),
          ("application/vnd.ollama.image.system", b"You are terse."),
          ("application/vnd.ollama.image.license", b"Apache License 2.0")]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def reg(smollm2, tiny_gguf):
    r = FakeRegistry().start()
    r.add_model("library/smollm2", "135m", smollm2)
    r.add_model("library/gpt-oss", "7b", tiny_gguf)
    r.add_model("library/styled", "1", smollm2, extra_layers=LAYERS)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, reg):
    models = str(tmp_path_factory.mktemp("ollama") / "models")
    env = node_env(models, reg.url, LLM_CTX_SIZE="4096", LLM_CPU_THREADS="2",
                   LLM_MAX_LOADED_MODELS="2")
    for name in (SMOL, TINY, STYLED):
        assert run_cli("pull", name, env=env).returncode == 0
    proc = NodeProcess(env)
    proc.models_dir, proc.env = models, env
    yield proc
    proc.stop()


@pytest.fixture
def client(node):
    return ollama.Client(host=node.url)


def test_list_shows_each_model_with_details_from_its_gguf(client, node):
    models = {m.model: m for m in client.list().models}
    assert {SMOL, TINY, STYLED} <= set(models)
    smol = models[SMOL]
    assert smol.details.format == "gguf" and smol.details.family == "llama"
    assert smol.details.parameter_size == "134.52M" and smol.details.quantization_level == "Q4_1"
    manifest = os.path.join(node.models_dir, "manifests", "registry.ollama.ai", "library", "smollm2", "135m")
    assert smol.digest == hashlib.sha256(open(manifest, "rb").read()).hexdigest()
    assert smol.size == os.path.getsize(os.path.join(
        node.models_dir, "blobs", json.load(open(manifest))["layers"][0]["digest"].replace(":", "-")))


def test_show_reads_the_gguf_and_the_ollama_layers(client):
    smol = client.show(SMOL)
    assert smol.modelinfo["general.architecture"] == "llama"
    assert smol.modelinfo["llama.context_length"] == 8192
    assert smol.modelinfo["tokenizer.ggml.tokens"] == []  # long arrays left out, as Ollama does
    assert "im_start" in smol.template  # the GGUF's own chat template
    styled = client.show(STYLED)
    assert styled.template == "{{ .System }} {{ .Prompt }}"
    assert styled.license == "Apache License 2.0"
    assert "num_predict" in styled.parameters and "temperature" in styled.parameters
    assert 'SYSTEM """You are terse."""' in styled.modelfile


def test_chat_not_streamed(client):
    r = client.chat(model=SMOL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                    options={"temperature": 0, "num_predict": 16}, stream=False)
    assert r.done and r.message.role == "assistant" and r.message.content
    assert r.eval_count == 16 and r.done_reason == "length"
    assert r.prompt_eval_count > 5 and r.total_duration >= r.eval_duration > 0


def test_chat_streamed_equals_not_streamed(client):
    kwargs = dict(model=SMOL, messages=[{"role": "user", "content": "Say hi."}],
                  options={"temperature": 0, "num_predict": 8, "seed": 3})
    parts = list(client.chat(stream=True, **kwargs))
    whole = client.chat(stream=False, **kwargs)
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == whole.done_reason


def test_generate_streamed_and_not(client):
    whole = client.generate(model=SMOL, prompt="Why is the sky blue?", options={"temperature": 0,
                                                                                "num_predict": 10})
    parts = list(client.generate(model=SMOL, prompt="Why is the sky blue?", stream=True,
                                 options={"temperature": 0, "num_predict": 10}))
    assert whole.response and "".join(p.response for p in parts) == whole.response
    assert whole.eval_count == 10
    raw = client.generate(model=SMOL, prompt="One, two,", raw=True, options={"temperature": 0,
                                                                             "num_predict": 4})
    assert raw.response and raw.done


def test_format_with_a_schema_gives_matching_json(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
              "required": ["name", "country"]}
    r = client.chat(model=SMOL, messages=[{"role": "user", "content": "Describe Paris."}], format=schema,
                    options={"temperature": 0, "num_predict": 200})
    doc = json.loads(r.message.content)
    assert set(doc) == {"name", "country"} and all(isinstance(v, str) for v in doc.values())
    answer = client.generate(model=SMOL, prompt="Give a JSON object whose key colour is red.",
                             format="json", options={"temperature": 0, "num_predict": 200})
    assert answer.done_reason == "stop" and json.loads(answer.response)


HISTORY = [{"role": "user", "content": "What is the weather in Paris?"},
           {"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
           {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
           {"role": "assistant", "content": "It is sunny in Paris."}]


@pytest.mark.parametrize("stream", [False, True])
def test_tools_give_calls_whose_arguments_match_the_schema(client, stream):
    ask = {"role": "user", "content": "What is the weather in Tokyo?"}
    kwargs = dict(model=SMOL, messages=HISTORY + [ask], tools=[WEATHER],
                  options={"temperature": 0, "num_predict": 60})
    if stream:
        calls = [c for part in client.chat(stream=True, **kwargs) for c in part.message.tool_calls or []]
    else:
        calls = client.chat(**kwargs).message.tool_calls
    [call] = calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Tokyo"}


def test_a_tool_result_in_the_history_is_accepted(client):
    r = client.chat(model=SMOL, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                         "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21C", "tool_name": "get_weather"}],
        tools=[WEATHER], options={"temperature": 0, "num_predict": 20})
    assert r.done


def test_embed_and_the_older_embeddings(client):
    one = client.embed(model=SMOL, input="The cat sat on the mat")
    two = client.embed(model=SMOL, input=["The cat sat on the mat", "Quantum chromodynamics"])
    assert one.embeddings[0] == two.embeddings[0] and two.embeddings[0] != two.embeddings[1]
    assert client.embeddings(model=SMOL, prompt="The cat sat on the mat").embedding == one.embeddings[0]


def test_ps_after_use_and_after_keep_alive_zero(client):
    client.generate(model=TINY, prompt="hi", options={"num_predict": 1})
    running = {m.model: m for m in client.ps().models}
    assert TINY in running and running[TINY].expires_at is not None
    unloaded = client.generate(model=TINY, keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert TINY not in [m.model for m in client.ps().models]
    loaded = client.chat(model=TINY, messages=[])
    assert loaded.done_reason == "load" and TINY in [m.model for m in client.ps().models]


def test_the_params_and_system_layers_of_an_ollama_model_apply(client, node):
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    r = client.chat(model=STYLED, messages=story)
    assert r.done_reason == "length" and r.eval_count == PARAMS["num_predict"]
    wider = client.chat(model=STYLED, messages=story, options={"num_predict": 20, "temperature": 0})
    assert wider.eval_count == 20  # the request's options override the layer's
    # The system layer is in the prompt: the same weights given the same system message under
    # SMOL find that whole prompt in their prompt cache (prompt_eval_count counts only the tokens
    # evaluated: the last one, read again for its logits); without it, far more are read.
    system = client.chat(model=SMOL, messages=[{"role": "system", "content": "You are terse."}] + story,
                         options={"num_predict": 1})
    plain = client.chat(model=SMOL, messages=story, options={"num_predict": 1})
    assert system.prompt_eval_count == 1 < plain.prompt_eval_count


def test_pull_with_progress_from_the_loopback_registry(client, reg, node):
    data = open(write_tiny_gguf(os.path.join(node.models_dir + "-p.gguf"), seed=11), "rb").read()
    reg.add_model("library/fresh", "1", data)
    events = list(client.pull("fresh:1", stream=True))
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert statuses[-3:-1] == ["verifying sha256 digest", "writing manifest"]
    weights = [e for e in events if e.digest == digest_of(data)]
    assert weights[0].total == len(data) and weights[-1].completed == len(data)
    assert weights[0].status == "pulling %s" % digest_of(data)[7:19]
    assert "fresh:1" in [m.model for m in client.list().models]
    assert client.pull("fresh:1", stream=False).status == "success"


def test_copy_then_delete_keeps_blobs_another_model_needs(client, node):
    client.copy(TINY, "mine:copy")
    assert "mine:copy" in [m.model for m in client.list().models]
    blobs = sorted(os.listdir(os.path.join(node.models_dir, "blobs")))
    client.delete("mine:copy")
    assert "mine:copy" not in [m.model for m in client.list().models]
    assert sorted(os.listdir(os.path.join(node.models_dir, "blobs"))) == blobs  # TINY still uses them
    client.chat(model=TINY, messages=[{"role": "user", "content": "x"}], options={"num_predict": 1})


def test_delete_removes_blobs_only_that_model_used(client, reg, node):
    data = open(write_tiny_gguf(os.path.join(node.models_dir + "-d.gguf"), seed=12), "rb").read()
    reg.add_model("library/gone", "1", data)
    client.pull("gone:1")
    blob = os.path.join(node.models_dir, "blobs", digest_of(data).replace(":", "-"))
    assert os.path.exists(blob)
    client.delete("gone:1")
    assert not os.path.exists(blob)
    assert StoreRecords(node.models_dir).manifest_digest("registry.ollama.ai/library/gone:1") is None


def test_an_unknown_model_is_a_404_response_error(client):
    for call in (lambda: client.chat(model="nothing:here", messages=[{"role": "user", "content": "x"}]),
                 lambda: client.show("nothing:here"), lambda: client.delete("nothing:here"),
                 lambda: client.embed(model="nothing:here", input="x")):
        with pytest.raises(ollama.ResponseError) as raised:
            call()
        assert raised.value.status_code == 404 and "nothing:here" in raised.value.error


def test_a_refused_option_names_itself(client):
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model=TINY, messages=[{"role": "user", "content": "x"}], options={"num_ctx": 10 ** 6})
    assert raised.value.status_code == 400 and "options.num_ctx" in raised.value.error
    # A sampler llama.cpp's server no longer runs is accepted (README's table), changing nothing.
    r = client.chat(model=TINY, messages=[{"role": "user", "content": "x"}],
                    options={"mirostat": 2, "num_predict": 1})
    assert r.done
    with pytest.raises(ollama.ResponseError) as raised:
        client.generate(model=TINY, prompt="x", template="{{ .Prompt }}")
    assert "template" in raised.value.error


def test_num_gpu_is_read_and_a_value_that_changes_nothing_loads_nothing_again(serve, caplog):
    """options.num_gpu is compared by the layers it would offload: on this CPU-only build every
    value offloads none, so the model in memory serves each request as it is (loading it again
    would hash its blob again for nothing); the reload itself is test_runtime's. A value of the
    wrong kind is refused by name."""
    import logging

    s = serve()
    client = ollama.Client(host=s.url)
    path = weights(s.node)[1]
    say = [{"role": "user", "content": "x"}]
    with caplog.at_level(logging.INFO):
        client.chat(model=TINY, messages=say, options={"num_predict": 2})
        loaded = s.node.pool.entry(path).llm
        assert (loaded.gpu_layers, loaded.gpu_max) == (0, 0)  # llama.cpp here has no GPU backend
        for layers in (0, 1, -1, 999):
            client.chat(model=TINY, messages=say, options={"num_predict": 2, "num_gpu": layers})
        client.generate(model=TINY, prompt="x", options={"num_predict": 2, "num_gpu": 1})
    assert s.node.pool.entry(path).llm is loaded
    assert "loading it again" not in caplog.text
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model=TINY, messages=say, options={"num_gpu": "all"})
    assert raised.value.status_code == 400 and "options.num_gpu" in raised.value.error


def test_an_ollama_error_names_ollamas_field(node):
    for options, field in (({"num_predict": 10 ** 7}, "options.num_predict"),
                           ({"temperature": 9}, "options.temperature")):
        r = requests.post(node.url + "/api/chat", timeout=60, json={
            "model": SMOL, "messages": [{"role": "user", "content": "x"}], "options": options})
        assert r.status_code == 400 and field in r.json()["error"], r.text
        assert "max_tokens" not in r.json()["error"]


CURL = ("curl -s -X POST {url}/api/chat -d '{{\"model\": \"gpt-oss:7b\", \"stream\": false, "
        "\"messages\": [{{\"role\": \"user\", \"content\": \"test\"}}], "
        "\"options\": {{\"num_predict\": 2}}}}'")


@pytest.mark.parametrize("n", [1, 5])
def test_the_users_scenarios_through_api_chat(node, n):
    manifest = json.load(open(os.path.join(node.models_dir, "manifests", "registry.ollama.ai", "library",
                                           "gpt-oss", "7b")))
    layer = manifest["layers"][0]
    blob = os.path.join(node.models_dir, "blobs", layer["digest"].replace(":", "-"))
    before = node.log().count("Starting auto-repair for model: gpt-oss:7b")
    subprocess.run('echo "corrupted" > %s' % blob, shell=True, check=True)
    script = "for i in {1..%d}; do\n  %s &\ndone\nwait\n" % (n, CURL.format(url=node.url))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120).stdout
    replies = bodies(out)
    assert len(replies) == n and all(r.get("done") is True and "message" in r for r in replies), out
    assert "sha256:" + hashlib.sha256(open(blob, "rb").read()).hexdigest() == layer["digest"]
    assert node.log().count("Starting auto-repair for model: gpt-oss:7b") == before + 1


BAD = [
    ("/api/chat", b"{not json"), ("/api/chat", b"[]"), ("/api/chat", b'{"model": "../../etc"}'),
    ("/api/chat", b'{"model": "gpt-oss:7b", "messages": "hi"}'),
    ("/api/chat", b'{"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x"}], '
                  b'"options": 5}'),
    ("/api/chat", b'{"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x"}], "format": 5}'),
    ("/api/chat", b'{"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x"}], '
                  b'"keep_alive": "x"}'),
    ("/api/chat", b'{"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x", '
                  b'"images": ["a"]}]}'),
    ("/api/generate", b'{"model": "gpt-oss:7b", "prompt": 5}'),
    ("/api/generate", b'{"model": "gpt-oss:7b", "prompt": "x", "context": [1, 2]}'),
    ("/api/embed", b'{"model": "gpt-oss:7b", "input": 5}'),
    ("/api/embed", b'{"model": "gpt-oss:7b", "input": "x", "dimensions": 0}'),
    ("/api/embed", b'{"model": "gpt-oss:7b", "input": "x", "dimensions": 65}'),  # above its 64
    ("/api/embed", b'{"model": "gpt-oss:7b", "input": "x", "truncate": "no"}'),
    ("/api/embeddings", b'{"model": "gpt-oss:7b", "prompt": ["x"]}'),
    ("/api/show", b'{"model": "/etc/passwd"}'), ("/api/pull", b'{"model": "a/b/c/d:e"}'),
    ("/api/copy", b'{"source": "gpt-oss:7b", "destination": "../../x"}'),
    ("/api/copy", b'{"source": "nothing:here", "destination": "x:1"}'),
    ("/api/unknown", b"{}"),
]


@pytest.mark.parametrize("path, raw", BAD)
def test_bad_ollama_bodies_are_4xx_in_ollamas_shape_and_touch_nothing(node, path, raw):
    before = tree(node.models_dir)
    r = requests.post(node.url + path, data=raw, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]
    assert tree(node.models_dir) == before


def test_delete_of_a_bad_name_touches_nothing(node):
    before = tree(node.models_dir)
    r = requests.delete(node.url + "/api/delete", data=b'{"model": "../../../etc/passwd"}', timeout=10)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert tree(node.models_dir) == before


JSON = st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.text(max_size=12)
OPTIONS = st.dictionaries(st.sampled_from(["temperature", "num_predict", "top_k", "seed", "stop",
                                           "num_ctx", "mirostat", "x"]), JSON, max_size=3)
CHAT = st.fixed_dictionaries({"model": st.sampled_from([TINY, "x:1"]) | JSON}, optional={
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                "content": st.text(max_size=10) | JSON}),
                         max_size=2) | JSON,
    "options": OPTIONS | JSON, "stream": st.booleans() | JSON, "format": st.just("json") | JSON,
    "keep_alive": st.sampled_from(["5m", "1s", "-1"]) | JSON,
    "tools": st.lists(st.just(WEATHER), max_size=1)})


def test_fuzzed_ollama_chat_bodies_never_get_a_5xx(node):
    seen = []

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(CHAT)
    def check(body):
        if isinstance(body.get("options"), dict):
            body["options"]["num_predict"] = 2
        r = requests.post(node.url + "/api/chat", data=json.dumps(body), timeout=60)
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()) == {"error"}
        else:
            lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
            assert not [x for x in lines if "error" in x], (body, r.text)

    check()
    print("ollama fuzzing: %d bodies, %d answered 200" % (len(seen), seen.count(200)))


def test_an_ollama_written_store_is_read_as_is(tmp_path, tiny_gguf, start_node, reg):
    """Manifests and blobs as Ollama writes them (no llmnode records): listed, shown, answered,
    and pinned at first use."""
    models = tmp_path / "ollama-models"
    blobs = models / "blobs"
    blobs.mkdir(parents=True)
    layers = []
    for media_type, data in [("application/vnd.ollama.image.model", tiny_gguf)] + LAYERS:
        digest = digest_of(data)
        (blobs / digest.replace(":", "-")).write_bytes(data)
        layers.append({"mediaType": media_type, "digest": digest, "size": len(data)})
    config = b'{"model_format":"gguf","model_family":"llama"}'
    (blobs / digest_of(config).replace(":", "-")).write_bytes(config)
    manifest = {"schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": digest_of(config), "size": len(config)}, "layers": layers}
    path = models / "manifests" / "registry.ollama.ai" / "library" / "olla" / "latest"
    path.parent.mkdir(parents=True)
    raw = json.dumps(manifest).encode()
    path.write_bytes(raw)
    node = start_node(node_env(str(models), reg.url))
    client = ollama.Client(host=node.url)
    assert [m.model for m in client.list().models] == ["olla:latest"]
    assert 'SYSTEM """You are terse."""' in client.show("olla").modelfile
    assert requests.post(node.url + "/api/show", json={"model": "olla"}, timeout=10).json()["system"] \
        == "You are terse."
    r = client.chat(model="olla", messages=[{"role": "user", "content": "hi"}])
    assert r.done and r.eval_count <= PARAMS["num_predict"] + 3
    assert StoreRecords(str(models)).manifest_digest("olla:latest") == hashlib.sha256(raw).hexdigest()


def test_health_stays_up_during_ollama_streams(node):
    results = []

    def stream():
        with requests.post(node.url + "/api/generate", json={"model": SMOL, "prompt": "Tell a story.",
                                                             "options": {"num_predict": 40}},
                           stream=True, timeout=120) as r:
            results.append(sum(1 for line in r.iter_lines() if line))

    t = threading.Thread(target=stream)
    t.start()
    assert requests.get(node.url + "/health", timeout=5).status_code == 200
    t.join(120)
    assert results and results[0] >= 2
