"""Anthropic's Messages API as clients send it, through the real `anthropic` client against a real
node process on the real model (SmolLM2): create, stream, tools, count_tokens, refusals by name,
the user's two scenarios and the repair errors in Anthropic's error shape."""

import hashlib
import json

import anthropic
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FAULTS, concurrent_answers, corrupt, dialect_fixtures, repair_fault, tree

SMOL = "smollm2:135m"
TINY = "gpt-oss:7b"
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"type": "string", "enum": ["C", "F"]}},
                            "required": ["city", "unit"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
COUNT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
# The client no longer takes sampling fields as arguments; the API (and older clients) still send them.
T0 = {"temperature": 0}


node, client = dialect_fixtures(
    "anthropic", lambda node: anthropic.Anthropic(base_url=node.url, api_key="unused", max_retries=0))


def test_create_answers_a_message(client):
    m = client.messages.create(model=SMOL, max_tokens=16, messages=[{"role": "user", "content": "Hi!"}],
                               system="You are terse.", extra_body=T0)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert 0 < m.usage.output_tokens <= 16 + 3 and m.usage.input_tokens > 0
    assert m.usage.cache_read_input_tokens >= 0


def test_max_tokens_stops_the_answer_with_stop_reason_max_tokens(client):
    m = client.messages.create(model=SMOL, max_tokens=3, messages=COUNT, extra_body=T0)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens >= 3


def test_stream_gives_the_text_and_the_final_message(client):
    kwargs = dict(model=SMOL, max_tokens=24, messages=COUNT, extra_body=T0,
                  system=[{"type": "text", "text": "You count."}])
    with client.messages.stream(**kwargs) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and [b.type for b in final.content] == ["text"] and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens") and 0 < final.usage.output_tokens <= 24 + 3
    counted = client.messages.count_tokens(model=SMOL, messages=COUNT, system="You count.")
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == counted.input_tokens


def test_the_raw_stream_is_anthropics_event_sequence(node):
    r = requests.post(node.url + "/v1/messages", stream=True, timeout=60, headers={
        "anthropic-version": "2023-06-01"}, json={"model": SMOL, "max_tokens": 6, "messages": COUNT,
                                                   "stream": True})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for block in r.text.strip().split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append(json.loads(data[6:]))
        assert events[-1]["type"] == name[7:]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert set(kinds[3:-3]) == {"content_block_delta"} and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "max_tokens" and events[-2]["usage"]["output_tokens"] >= 6


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_matches_the_schema(client, stream):
    kwargs = dict(model=SMOL, max_tokens=80, messages=ASK, tools=[WEATHER], extra_body=T0,
                  tool_choice={"type": "tool", "name": "get_weather"})
    if stream:
        with client.messages.stream(**kwargs) as s:
            m = s.get_final_message()
    else:
        m = client.messages.create(**kwargs)
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert set(use.input) == {"city", "unit"} and use.input["unit"] in ("C", "F")
    assert isinstance(use.input["city"], str)


def test_tool_choice_any_calls_one_of_the_tools(client):
    m = client.messages.create(model=SMOL, max_tokens=80, messages=ASK, extra_body=T0,
                               tools=[WEATHER], tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use" and m.content[-1].type == "tool_use"


def test_a_tool_result_sent_back_is_answered_in_text(client):
    first = client.messages.create(model=SMOL, max_tokens=80, messages=ASK, tools=[WEATHER], extra_body=T0,
                                   tool_choice={"type": "tool", "name": "get_weather"})
    use = first.content[-1]
    result = {"type": "tool_result", "tool_use_id": use.id,
              "content": [{"type": "text", "text": "21 C, clear sky"}]}
    blocks = [b.model_dump(exclude_none=True) for b in first.content]
    history = ASK + [{"role": "assistant", "content": blocks}, {"role": "user", "content": [result]}]
    answer = client.messages.create(model=SMOL, max_tokens=40, messages=history, tools=[WEATHER],
                                    tool_choice={"type": "none"}, extra_body=T0)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text
    # The result is in the prompt: the same history without it reads fewer tokens.
    counted = client.messages.count_tokens(model=SMOL, messages=history, tools=[WEATHER])
    shorter = client.messages.count_tokens(model=SMOL, messages=history[:2], tools=[WEATHER])
    assert counted.input_tokens > shorter.input_tokens


def test_count_tokens_is_the_prompt_create_reads(client):
    counted = client.messages.count_tokens(model=SMOL, messages=COUNT, system="You count.")
    m = client.messages.create(model=SMOL, max_tokens=2, messages=COUNT, system="You count.")
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens
    with_tools = client.messages.count_tokens(model=SMOL, messages=COUNT, system="You count.",
                                              tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens


def test_stop_sequences_end_the_answer_before_the_sequence(client):
    plain = client.messages.create(model=SMOL, max_tokens=30, messages=COUNT, extra_body=T0)
    assert "2" in plain.content[0].text and plain.stop_reason == "max_tokens"
    m = client.messages.create(model=SMOL, max_tokens=30, messages=COUNT, extra_body=T0,
                               stop_sequences=["2", "two"])
    assert "2" not in m.content[0].text and m.usage.output_tokens < plain.usage.output_tokens
    # The engine names the sequence it matched.
    assert m.stop_reason == "stop_sequence" and m.stop_sequence in ("2", "two")


def test_an_unknown_model_is_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="nothing:here", max_tokens=2, messages=ASK)
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == "not_found_error"
    assert "nothing:here" in raised.value.body["error"]["message"]


BASE = {"model": SMOL, "max_tokens": 2, "messages": ASK}
REFUSED = [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "text", "media_type": "text/plain", "data": "x"}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, "messages[0].content[0].content[0].type"),
    ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
]
# Documented fields that change nothing here: accepted (they were refused before the agents' rule).
ACCEPTED = [
    {"messages": ASK + [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "x", "signature": "s"}, {"type": "text", "text": "Rain."}]}] + ASK},
    {"output_config": {"effort": "high"}}, {"thinking": {"type": "enabled", "budget_tokens": 1024}},
    {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"tools": [{"type": "code_execution_20250522", "name": "code_execution"}]},
    {"container": "container_1"}, {"context_management": {"edits": []}},
    {"tools": [dict(WEATHER, input_examples=[{}])]},
    {"system": [{"type": "text", "text": "x", "citations": [{"type": "char_location"}]}]},
    {"messages": [{"role": "system", "content": "Be brief."}] + ASK},
]


@pytest.mark.parametrize("change", ACCEPTED, ids=[json.dumps(c)[:40] for c in ACCEPTED])
def test_documented_fields_that_change_nothing_here_are_accepted(node, change):
    r = requests.post(node.url + "/v1/messages", json=dict(BASE, **change), timeout=60)
    assert r.status_code == 200, r.text
    assert "llmnode-ignored-fields" not in r.headers


@pytest.mark.parametrize("change, name", REFUSED, ids=[n for _, n in REFUSED])
def test_a_field_not_honoured_is_refused_by_name(node, change, name):
    before = tree(node.models_dir)
    r = requests.post(node.url + "/v1/messages", json=dict(BASE, **change), timeout=60)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "'%s'" % name in body["error"]["message"]
    assert tree(node.models_dir) == before


def test_fields_that_change_nothing_are_accepted(client):
    m = client.messages.create(model=SMOL, max_tokens=2, messages=ASK, metadata={"user_id": "u1"},
                               thinking={"type": "disabled"}, service_tier="auto", cache_control={
                                   "type": "ephemeral"}, extra_headers={"anthropic-beta": "x"},
                               extra_body={"top_k": 40, "top_p": 0.9, "temperature": 0.5})
    assert m.content


def test_thinking_fields_are_accepted_on_a_model_that_does_not_think(client):
    """SmolLM2 has no reasoning format: the answer simply has no thinking block."""
    m = client.messages.create(model=SMOL, max_tokens=2, messages=ASK + [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"},
                                          {"type": "redacted_thinking", "data": "abc"},
                                          {"type": "text", "text": "Hi"}]},
        {"role": "user", "content": "Again"}],
        thinking={"type": "enabled", "budget_tokens": 1024}, extra_body={"output_config": {"effort": "high"}})
    assert [b.type for b in m.content] == ["text"]


def test_output_config_format_gives_json_matching_the_schema(client):
    # Bounded strings: a greedy answer may otherwise run on inside one (JSON lets a string be long).
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    m = client.messages.create(model=SMOL, max_tokens=60, extra_body=T0, messages=[
        {"role": "user", "content": "Name a city and its country."}],
        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert list(json.loads(m.content[0].text)) == ["city", "country"]


BAD = [
    b"{not json", b"[]", b"", b'{"model": "../../etc", "max_tokens": 2, "messages": []}',
    json.dumps(dict(BASE, max_tokens=0)).encode(),
    json.dumps(dict(BASE, max_tokens="2")).encode(),
    json.dumps(dict(BASE, messages=[])).encode(),
    json.dumps(dict(BASE, messages="hi")).encode(),
    json.dumps(dict(BASE, messages=[{"role": "tool", "content": "x"}])).encode(),
    json.dumps(dict(BASE, messages=[{"role": "user", "content": 5}])).encode(),
    json.dumps(dict(BASE, messages=[{"role": "user", "content": [{"type": "tool_use", "id": "x",
                                                                  "name": "x", "input": {}}]}])).encode(),
    json.dumps(dict(BASE, messages=[{"role": "assistant", "content": [
        {"type": "tool_use", "id": "x", "name": "x", "input": "{}"}]}])).encode(),
    json.dumps(dict(BASE, output_config={"format": {"type": "json_schema"}})).encode(),
    json.dumps(dict(BASE, temperature=1.5)).encode(),
    json.dumps(dict(BASE, top_k=-1)).encode(),
    json.dumps(dict(BASE, stop_sequences="x")).encode(),
    json.dumps(dict(BASE, stop_sequences=[""])).encode(),
    json.dumps(dict(BASE, system=5)).encode(),
    json.dumps(dict(BASE, tools=[{"name": "x"}])).encode(),
    json.dumps(dict(BASE, tools=[dict(WEATHER, name="a b")])).encode(),
    json.dumps(dict(BASE, tool_choice={"type": "any"})).encode(),
    json.dumps(dict(BASE, tools=[WEATHER], tool_choice={"type": "tool", "name": "other"})).encode(),
    json.dumps(dict(BASE, tools=[WEATHER], tool_choice="auto")).encode(),
    json.dumps(dict(BASE, metadata="x")).encode(),
    json.dumps(dict(BASE, model="nothing:here")).encode(),
]


@pytest.mark.parametrize("raw", BAD)
def test_bad_bodies_are_4xx_in_anthropics_shape_and_touch_nothing(node, raw):
    before = tree(node.models_dir)
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = requests.post(node.url + path, data=raw, timeout=60, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.text)
        assert_anthropic_error(r)
    assert tree(node.models_dir) == before


def test_max_tokens_is_required_for_messages_only(node):
    r = requests.post(node.url + "/v1/messages", json={"model": SMOL, "messages": ASK}, timeout=60)
    assert r.status_code == 400 and "'max_tokens'" in r.json()["error"]["message"]
    r = requests.post(node.url + "/v1/messages/count_tokens", json={"model": SMOL, "messages": ASK},
                      timeout=60)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def assert_anthropic_error(r):
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"]


def test_unknown_routes_and_methods_answer_in_anthropics_shape(node):
    r = requests.post(node.url + "/v1/messages/batches", json={}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.get(node.url + "/v1/messages", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


JSON = (st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.floats(allow_nan=False)
        | st.text(max_size=12))
BLOCK = st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use", "tool_result", "image", "x"])},
                              optional={"text": st.text(max_size=10) | JSON, "id": JSON, "name": JSON,
                                        "input": st.just({}) | JSON, "tool_use_id": JSON,
                                        "content": st.text(max_size=10) | JSON})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                 "content": st.text(max_size=20) | st.lists(BLOCK, max_size=2) | JSON})
FUZZ = st.fixed_dictionaries({"model": st.sampled_from([TINY, "x:1"]) | JSON}, optional={
    "max_tokens": st.integers(-1, 3) | JSON, "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "system": st.text(max_size=10) | st.lists(BLOCK, max_size=1) | JSON,
    "stop_sequences": st.lists(st.text(max_size=3), max_size=2) | JSON, "temperature": JSON,
    "top_p": JSON, "top_k": JSON, "stream": st.booleans() | JSON,
    "tools": st.lists(st.just(WEATHER) | JSON, max_size=2) | JSON,
    "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
                                         optional={"name": st.just("get_weather") | JSON}) | JSON,
    "metadata": JSON, "thinking": JSON})


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_fuzzed_bodies_never_get_a_5xx(node, path):
    seen = []

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(FUZZ)
    def check(body):
        r = requests.post(node.url + path, data=json.dumps(body), timeout=60,
                          headers={"Content-Type": "application/json"})
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert_anthropic_error(r)
        else:
            assert "event: error" not in r.text, (body, r.text)

    check()
    assert requests.get(node.url + "/health", timeout=5).status_code == 200
    print("%s fuzzing: %d bodies, %d answered 200" % (path, len(seen), seen.count(200)))


# -- the user's scenarios and the repair errors, in this dialect -------------------------------------

def test_scenario_1_a_corrupted_model_is_repaired_and_answered(node, client):
    layer, blob, repairs = corrupt(node)
    m = client.messages.create(model=TINY, max_tokens=4, messages=[{"role": "user", "content": "test"}])
    assert m.type == "message" and m.model == TINY
    assert "sha256:" + hashlib.sha256(open(blob, "rb").read()).hexdigest() == layer["digest"]
    assert node.log().count("Starting auto-repair for model: gpt-oss:7b") == repairs + 1


def test_scenario_2_five_concurrent_requests_share_one_repair(node, client):
    results, served, size = concurrent_answers(node, 5, lambda: client.messages.create(
        model=TINY, max_tokens=4, messages=[{"role": "user", "content": "test"}]))
    assert [getattr(m, "type", m) for m in results] == ["message"] * 5
    assert served == size


@pytest.mark.parametrize("kind, status, message", FAULTS, ids=[f[0] for f in FAULTS])
@pytest.mark.parametrize("stream", [False, True])
def test_repair_errors_are_anthropic_api_errors(serve, registry, mount_tmpfs, kind, status, message, stream):
    body = {"model": TINY, "max_tokens": 2, "messages": [{"role": "user", "content": "test"}],
            "stream": stream}
    r = repair_fault(kind, serve, registry, mount_tmpfs, "/v1/messages", body)
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    assert message in r.json()["error"]["message"]


def test_the_api_key_is_accepted_as_x_api_key(serve):
    s = serve(LLM_API_KEY="s3cret-key")
    ok = anthropic.Anthropic(base_url=s.url, api_key="s3cret-key", max_retries=0)
    assert ok.messages.create(model=TINY, max_tokens=2, messages=ASK).type == "message"
    bearer = anthropic.Anthropic(base_url=s.url, auth_token="s3cret-key", max_retries=0)
    assert bearer.messages.count_tokens(model=TINY, messages=ASK).input_tokens > 0
    wrong = anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        wrong.messages.create(model=TINY, max_tokens=2, messages=ASK)
    assert raised.value.body["error"]["type"] == "authentication_error"
