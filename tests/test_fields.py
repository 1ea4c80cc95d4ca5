"""The field rule, in every dialect, against a real node process on the tiny model: a field the
real API documents is honoured (it changes the answer) or accepted (it changes nothing, README's
tables say so); a field no API has is ignored and named in the `llmnode-ignored-fields` header and
the log; only what cannot be honoured and would change the answer is refused, in the dialect's
shape. And a model's Modelfile `system` and `params` layers apply on every dialect."""

import json

import pytest
import requests

from tests.conftest import NodeProcess, node_env, run_cli, tree, wait_for
from tests.fakeregistry import FakeRegistry

TINY = "gpt-oss:7b"
STYLED = "styled:1"  # the tiny weights with a system and a params layer
PARAMS = {"num_predict": 6, "temperature": 0, "seed": 3}
SYSTEM = "You are terse."
LAYERS = [("application/vnd.ollama.image.params", json.dumps(PARAMS).encode()),
          ("application/vnd.ollama.image.system", SYSTEM.encode())]
SAY = [{"role": "user", "content": "Say something."}]
# The tiny model's byte vocabulary: token 2 is end-of-text, barred so an answer runs its budget.
NO_END = {"2": -100}

# A minimal request per route; the field tables below are laid over it.
BASE = {"/v1/chat/completions": {"model": TINY, "messages": SAY, "max_tokens": 3, "logit_bias": NO_END},
        "/v1/completions": {"model": TINY, "prompt": "x", "max_tokens": 3, "logit_bias": NO_END},
        "/v1/responses": {"model": TINY, "input": "x", "max_output_tokens": 3, "temperature": 0},
        "/v1/messages": {"model": TINY, "messages": SAY, "max_tokens": 3, "temperature": 0},
        "/api/chat": {"model": TINY, "messages": SAY, "stream": False,
                      "options": {"num_predict": 3, "temperature": 0}},
        "/api/generate": {"model": TINY, "prompt": "x", "stream": False,
                          "options": {"num_predict": 3, "temperature": 0}}}

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# Fields the real APIs document that change nothing here: 200, and nothing named as ignored.
ACCEPTED = [
    ("/v1/chat/completions", {"user": "u", "metadata": {"k": "v"}, "store": True, "service_tier": "auto",
                              "safety_identifier": "s", "prompt_cache_key": "k", "parallel_tool_calls": False,
                              "prompt_cache_retention": "24h", "verbosity": "low", "modalities": ["text"],
                              "reasoning_effort": "high", "prediction": {"type": "content", "content": "x"}}),
    ("/v1/completions", {"user": "u", "metadata": {"k": "v"}, "store": False}),
    ("/v1/responses", {"client_metadata": {"a": "b"}, "store": True, "metadata": {"k": "v"}, "user": "u",
                       "include": ["reasoning.encrypted_content"], "reasoning": {"summary": "auto"},
                       "parallel_tool_calls": True, "service_tier": "auto", "safety_identifier": "s",
                       "prompt_cache_key": "k", "truncation": "auto", "max_tool_calls": 3,
                       "text": {"verbosity": "low"},
                       "tools": [{"type": "web_search"}, {"type": "local_shell"},
                                 {"type": "image_generation"}]}),
    ("/v1/messages", {"metadata": {"user_id": "u"}, "context_management": {"edits": []},
                      "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
                      "cache_control": {"type": "ephemeral"}, "service_tier": "auto",
                      "system": [{"type": "text", "text": "Be brief.",
                                  "cache_control": {"type": "ephemeral"}}],
                      "tools": [{"name": "f", "input_schema": {"type": "object"}, "defer_loading": True,
                                 "cache_control": {"type": "ephemeral"}},
                                {"type": "web_search_20250305", "name": "web_search"}],
                      "tool_choice": {"type": "none"}}),
    ("/api/chat", {"think": False, "keep_alive": "5m",
                   "options": {"num_predict": 3, "num_thread": 2, "typical_p": 0.9, "num_gpu": 0}}),
    ("/api/generate", {"think": False, "options": {"num_predict": 3, "repeat_last_n": 64, "use_mmap": True}}),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_gguf):
    reg = FakeRegistry().start()
    reg.add_model("library/gpt-oss", "7b", tiny_gguf)
    reg.add_model("library/styled", "1", tiny_gguf, extra_layers=LAYERS)
    models = str(tmp_path_factory.mktemp("fields") / "models")
    env = node_env(models, reg.url, LLM_CTX_SIZE="1024", LLM_CPU_THREADS="2")
    for name in (TINY, STYLED):
        assert run_cli("pull", name, env=env).returncode == 0
    proc = NodeProcess(env)
    proc.models_dir = models
    yield proc
    proc.stop()
    reg.stop()


def post(node, path, change):
    body = json.loads(json.dumps(BASE[path]))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key].update(value)
        else:
            body[key] = value
    return requests.post(node.url + path, json=body, timeout=60)


@pytest.mark.parametrize("path, change", ACCEPTED, ids=[p for p, _ in ACCEPTED])
def test_fields_the_real_api_documents_are_accepted(node, path, change):
    r = post(node, path, change)
    assert r.status_code == 200, r.text
    assert "llmnode-ignored-fields" not in r.headers


UNKNOWN = [
    ("/v1/chat/completions", {"bogus": 1, "tools": [dict(TOOL, extra=1)]}, ["bogus", "tools[0].extra"]),
    ("/v1/completions", {"frobnicate": True}, ["frobnicate"]),
    ("/v1/responses", {"nonsense": [], "input": [{"role": "user", "content": "x", "mood": "glad"}]},
     ["nonsense", "input[0].mood"]),
    ("/v1/messages", {"temprature": 0.5, "messages": [{"role": "user", "content": "x", "name": "me"}]},
     ["temprature", "messages[0].name"]),
    ("/api/chat", {"optins": {}, "options": {"num_predikt": 3}}, ["optins", "options.num_predikt"]),
    ("/api/generate", {"sistem": "x"}, ["sistem"]),
]


@pytest.mark.parametrize("path, change, named", UNKNOWN, ids=[p for p, _, _ in UNKNOWN])
def test_a_field_no_api_has_is_ignored_and_named_in_the_header_and_the_log(node, path, change, named):
    r = post(node, path, change)
    assert r.status_code == 200, r.text
    assert r.headers["llmnode-ignored-fields"].split(", ") == named
    line = "ignored fields no API has: %s" % ", ".join(named)
    # The node's log reaches this process through a pipe and a reader thread: wait for the line.
    wait_for(lambda: line in node.log(), "the log line naming %s" % named, timeout=10)


# Only where honouring is impossible and ignoring would change the answer: 400, named, in the
# dialect's shape, and nothing on disk changes.
REFUSED = [
    ("/v1/chat/completions", {"n": 9}, "'n'"),  # above LLM_PARALLEL
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}, "messages[0].content[0].type"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/responses", {"previous_response_id": "resp_1"}, "previous_response_id"),
    ("/v1/responses", {"conversation": "conv_1"}, "conversation"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     "messages[0].content[0].type"),
    ("/v1/messages", {"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["AA=="]}]}, "messages[0].images"),
    ("/api/generate", {"images": ["AA=="]}, "images"),
]


def error_message(path, body):
    if path.startswith("/api/"):
        return body["error"]
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return body["error"]["message"]
    assert body["error"]["code"] == "unsupported_parameter", body
    return body["error"]["message"]


@pytest.mark.parametrize("path, change, name", REFUSED, ids=[p + ":" + n for p, _, n in REFUSED])
def test_a_field_that_cannot_be_honoured_is_refused_by_name_in_the_dialects_shape(node, path, change, name):
    before = tree(node.models_dir)
    r = post(node, path, change)
    assert r.status_code == 400, r.text
    assert name in error_message(path, r.json())
    assert tree(node.models_dir) == before


# A honoured field changes the answer: each dialect's budget and stop strings.
HONOURED = [
    ("/v1/chat/completions", {"max_tokens": 1}, lambda b: b["usage"]["completion_tokens"]),
    ("/v1/completions", {"max_tokens": 1}, lambda b: b["usage"]["completion_tokens"]),
    ("/v1/responses", {"max_output_tokens": 1}, lambda b: b["usage"]["output_tokens"]),
    ("/v1/messages", {"max_tokens": 1}, lambda b: b["usage"]["output_tokens"]),
    ("/api/chat", {"options": {"num_predict": 1}}, lambda b: b["eval_count"]),
    ("/api/generate", {"options": {"num_predict": 1}}, lambda b: b["eval_count"]),
]


@pytest.mark.parametrize("path, change, count", HONOURED, ids=[p for p, _, _ in HONOURED])
def test_a_honoured_field_changes_the_answer(node, path, change, count):
    # Greedy, so each answer is the same every run; the tiny model may end its own turn before
    # the base budget of 3, never before 2.
    assert count(post(node, path, {}).json()) in (2, 3)
    assert count(post(node, path, change).json()) == 1


# -- a Modelfile's layers, on every dialect ---------------------------------------------------------

def answer_text(path, body):
    if path == "/v1/chat/completions":
        return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]
    if path == "/v1/responses":
        return body["output"][0]["content"][0]["text"], body["usage"]["input_tokens"]
    if path == "/v1/messages":
        return body["content"][0]["text"], body["usage"]["input_tokens"]
    return body["message"]["content"], body["prompt_eval_count"]


LAYERED = {"/v1/chat/completions": {"model": STYLED, "messages": SAY},
           "/v1/responses": {"model": STYLED, "input": SAY},
           "/v1/messages": {"model": STYLED, "messages": SAY, "max_tokens": PARAMS["num_predict"]},
           "/api/chat": {"model": STYLED, "messages": SAY, "stream": False}}


def test_a_models_system_and_params_layers_apply_on_every_dialect(node):
    # The same weights without layers, given the system prompt and the options by hand.
    by_hand = requests.post(node.url + "/v1/chat/completions", json={
        "model": TINY, "messages": [{"role": "system", "content": SYSTEM}] + SAY, "temperature": 0,
        "seed": 3, "max_tokens": PARAMS["num_predict"]}, timeout=60).json()
    expected = by_hand["choices"][0]["message"]["content"]
    for path, body in LAYERED.items():
        r = requests.post(node.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        text, _prompt = answer_text(path, r.json())
        assert text == expected, path  # the system prompt, temperature 0 and the budget, from the layers
    assert len(expected) > 0


def test_a_requests_own_field_overrides_the_layer(node):
    r = requests.post(node.url + "/v1/chat/completions", json={"model": STYLED, "messages": SAY,
                                                               "max_tokens": 2, "logit_bias": NO_END},
                      timeout=60).json()
    assert r["usage"]["completion_tokens"] == 2  # not the layer's num_predict
    own = requests.post(node.url + "/v1/chat/completions", json={
        "model": STYLED, "messages": [{"role": "system", "content": "Be loud."}] + SAY}, timeout=60).json()
    layered = requests.post(node.url + "/v1/chat/completions", json={"model": STYLED, "messages": SAY},
                            timeout=60).json()
    # A system message of the request's own replaces the layer's.
    assert own["usage"]["prompt_tokens"] != layered["usage"]["prompt_tokens"]
