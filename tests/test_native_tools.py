"""Tools through a model's own chat template (the Hermes/Qwen `<tool_call>` style), on the tiny
model with such a template: the template renders the tools, calls and results; a forced call is
constrained to a `<tool_call>` block whose arguments match the schema."""

import json

import pytest
import requests

import llmnode
from repair import operations
from tests.conftest import Served, settings_for
from tests.fakeregistry import FakeRegistry
from tests.tinymodel import write_tiny_gguf

HERMES = (
    "{%- if tools %}<|im_start|>system\nYou may call functions.\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}\n{%- endfor %}\n</tools>\n"
    "Answer with <tool_call>\n{\"name\": <name>, \"arguments\": <object>}\n</tool_call><|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant"
    "{%- for tc in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def node(tmp_path, models_dir):
    reg = FakeRegistry().start()
    reg.add_model("library/hermes", "1", open(write_tiny_gguf(tmp_path / "h.gguf", seed=4,
                                                              chat_template=HERMES), "rb").read())
    settings = settings_for(models_dir, reg.url, LLM_CTX_SIZE="2048")
    prompts = []

    # The prompt as the model reads it (the tiny model's tokenizer shows spaces as SentencePiece's "▁").
    n = llmnode.Node(settings, on_prompt=lambda text: prompts.append(text.replace("\u2581", " ")))
    operations.pull(n.repairs, llmnode.names.parse("hermes:1"))
    served = Served(n)
    served.prompts = prompts
    yield served
    served.close()
    reg.stop()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_goes_through_the_template_and_comes_back_as_tool_calls(node, choice, stream):
    r = node.post("/v1/chat/completions", {"model": "hermes:1", "messages": ASK, "tools": [WEATHER],
                                           "tool_choice": choice, "max_tokens": 120, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        calls = [c for ch in chunks for d in ch["choices"] for c in d["delta"].get("tool_calls") or []]
        finish = [d["finish_reason"] for ch in chunks for d in ch["choices"] if d["finish_reason"]]
    else:
        assert r.json()["id"].startswith("chatcmpl-") and not r.json()["id"].startswith("chatchat")
        calls = r.json()["choices"][0]["message"].get("tool_calls", [])
        finish = [r.json()["choices"][0]["finish_reason"]]
    assert finish == ["tool_calls"], (r.text, node.prompts[-1:])
    [call] = calls
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 12
    # The model's own template rendered the tools: no generic system prompt was added.
    assert '<tools>{"type": "function", "function": {"name": "get_weather"' in node.prompts[-1]
    assert "Respond in JSON format" not in node.prompts[-1]


def test_the_history_of_calls_and_results_is_rendered_by_the_template(node):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = node.post("/v1/chat/completions", {"model": "hermes:1", "messages": history, "tools": [WEATHER],
                                           "max_tokens": 8})
    assert r.status_code == 200, r.text
    prompt = node.prompts[-1]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt, prompt


def test_native_blocks_are_parsed_and_unknown_or_broken_ones_left_as_text():
    tools = [llmnode.Tool("get_weather", "", {})]
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call><tool_call>{broken')
    calls, rest = llmnode.parse_native_calls(text, tools)
    assert calls == [{"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert rest == "Let me check."
    broken = 'Hm <tool_call>{"name": "nope"}</tool_call>'
    assert llmnode.parse_native_calls(broken, tools) == ([], broken)
    raw = '<tool_call>{"name": "get_weather", "arguments": {"city": "a\x07b"}}</tool_call>'
    assert llmnode.parse_native_calls(raw, tools)[0] == [
        {"name": "get_weather", "arguments": {"city": "a\x07b"}}]


def test_a_template_without_tool_blocks_uses_the_generic_format(serve):
    s = serve(LLM_CTX_SIZE="2048")
    r = s.post("/v1/chat/completions", {"model": "gpt-oss:7b", "messages": ASK, "tools": [WEATHER],
                                        "tool_choice": "required", "max_tokens": 200})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert not llmnode.renders_tools(s.node.pool.entry(s.node.pool.loaded()[0]).formatter)
    assert requests.get(s.url + "/health", timeout=5).status_code == 200
