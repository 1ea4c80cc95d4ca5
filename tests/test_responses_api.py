"""OpenAI's Responses API (stateless) through the real `openai` client against a real node process
on the real model (SmolLM2): create, stream, parse, function calls, refusals by name, the user's
two scenarios and the repair errors in OpenAI's error shape."""

import hashlib
import json

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tests.conftest import (
    FAULTS,
    SMOL,
    TINY,
    concurrent_answers,
    corrupt,
    dialect_fixtures,
    openai_client,
    post_without_5xx,
    repair_fault,
    tree,
)

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}, "strict": True}
ASK = "What is the weather in Paris?"


node, client = dialect_fixtures("responses", openai_client)


def test_create_answers_with_a_message(client):
    r = client.responses.create(model=SMOL, input="Say hello.", instructions="You are terse.",
                                max_output_tokens=16, temperature=0, store=False)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.output_text == item.content[0].text and r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16 + 3
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_max_output_tokens_makes_the_response_incomplete(client):
    r = client.responses.create(model=SMOL, input="Count from 1 to 50.", max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"


def test_input_items_carry_the_conversation(client):
    r = client.responses.create(model=SMOL, max_output_tokens=8, temperature=0, input=[
        {"role": "developer", "content": "You are terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi, I am Ann."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi Ann."}]},
        {"role": "user", "content": "What is my name?"}])
    assert r.output_text


def test_a_stream_is_the_responses_event_sequence(client):
    with client.responses.stream(model=SMOL, input="Count from 1 to 20.", max_output_tokens=400,
                                 temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and events[-4].text == text
    assert final.status == "completed" and final.usage.output_tokens > 0
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(node):
    r = requests.post(node.url + "/v1/responses", timeout=60, json={
        "model": SMOL, "input": "Count from 1 to 50.", "max_output_tokens": 3, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


class City(BaseModel):
    name: str
    country: str
    population: int


@pytest.mark.parametrize("stream", [False, True])
def test_parse_returns_the_pydantic_object(client, stream):
    kwargs = dict(model=SMOL, input="Describe Paris.", text_format=City, temperature=0, max_output_tokens=80)
    if stream:
        with client.responses.stream(**kwargs) as s:
            done = s.get_final_response()
    else:
        done = client.responses.parse(**kwargs)
    city = done.output_parsed
    assert isinstance(city, City) and city.name
    assert list(json.loads(done.output_text)) == ["name", "country", "population"]


def test_json_object_format_parses(client):
    r = client.responses.create(model=SMOL, input="Give a JSON object whose key colour is red.",
                                text={"format": {"type": "json_object"}}, temperature=0,
                                max_output_tokens=200)
    assert isinstance(json.loads(r.output_text), (dict, list, str, int, float))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_function_call_matches_the_schema(client, stream, choice):
    kwargs = dict(model=SMOL, input=ASK, tools=[WEATHER], tool_choice=choice, temperature=0,
                  max_output_tokens=80)
    if stream:
        with client.responses.stream(**kwargs) as s:
            kinds = [e.type for e in s]
            done = s.get_final_response()
        assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                              "response.function_call_arguments.done", "response.output_item.done"]
    else:
        done = client.responses.create(**kwargs)
    [call] = [item for item in done.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    args = json.loads(call.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")


def test_a_function_call_output_sent_back_is_answered(client):
    first = client.responses.create(model=SMOL, input=ASK, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_output_tokens=80)
    call = first.output[-1]
    output = {"type": "function_call_output", "call_id": call.call_id,
              "output": '{"temp": 21, "sky": "clear"}'}
    history = [{"role": "user", "content": ASK}] + [item.model_dump(exclude_none=True)
                                                    for item in first.output] + [output]
    answer = client.responses.create(model=SMOL, input=history, tools=[WEATHER], tool_choice="none",
                                     temperature=0, max_output_tokens=40)
    assert [item.type for item in answer.output] == ["message"] and answer.output_text


def test_an_unknown_model_is_a_404_in_openais_shape(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model="nothing:here", input="x")
    assert raised.value.body["code"] == "model_not_found"


BASE = {"model": SMOL, "input": "x", "max_output_tokens": 2}
REFUSED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
]
# Documented fields that change nothing here: accepted (they were refused before the agents' rule).
ACCEPTED = [
    {"reasoning": {"effort": "high"}}, {"include": ["message.output_text.logprobs"]},
    {"truncation": "auto"}, {"max_tool_calls": 2}, {"text": {"verbosity": "low"}},
    {"tool_choice": {"type": "web_search_preview"}, "tools": [WEATHER]},
    {"input": [{"type": "reasoning", "summary": []}, {"role": "user", "content": "x"}]},
] + [{"tools": [{"type": kind}]} for kind in (
    "web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
    "computer_use", "mcp", "image_generation", "local_shell")]


@pytest.mark.parametrize("change", ACCEPTED, ids=[json.dumps(c)[:40] for c in ACCEPTED])
def test_documented_fields_that_change_nothing_here_are_accepted(node, change):
    r = requests.post(node.url + "/v1/responses", json=dict(BASE, **change), timeout=60)
    assert r.status_code == 200, r.text
    assert "llmnode-ignored-fields" not in r.headers


def test_a_field_no_api_has_is_named_not_refused(node):
    r = requests.post(node.url + "/v1/responses", json=dict(BASE, seed=1), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["llmnode-ignored-fields"] == "seed"


@pytest.mark.parametrize("change, name", REFUSED, ids=[n + ":" + json.dumps(c)[:40] for c, n in REFUSED])
def test_a_field_not_honoured_is_refused_by_name(node, change, name):
    before = tree(node.models_dir)
    r = requests.post(node.url + "/v1/responses", json=dict(BASE, **change), timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and "'%s'" % name in err["message"], err
    assert tree(node.models_dir) == before


def test_reasoning_fields_are_accepted_on_a_model_that_does_not_think(client):
    """SmolLM2 has no reasoning format: the answer simply has no reasoning item."""
    r = client.responses.create(model=SMOL, max_output_tokens=2,
                                reasoning={"effort": "high", "summary": "auto"},
                                include=["reasoning.encrypted_content"], input=[
                                    {"type": "reasoning", "id": "rs_1", "summary": [],
                                     "encrypted_content": "opaque"},
                                    {"role": "user", "content": "x"}])
    assert [item.type for item in r.output] == ["message"]


def test_fields_that_change_nothing_are_accepted(client):
    r = client.responses.create(model=SMOL, input="x", max_output_tokens=2, store=True, metadata={"k": "v"},
                                user="u1", parallel_tool_calls=False, background=False, truncation="disabled",
                                include=[], text={"format": {"type": "text"}})
    assert r.output_text is not None


BAD = [
    {"model": SMOL}, {"model": SMOL, "input": []}, {"model": SMOL, "input": 5},
    {"model": "../x", "input": "x"},
    dict(BASE, input=[{"role": "tool", "content": "x"}]),
    dict(BASE, input=[{"role": "user", "content": 5}]),
    dict(BASE, input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{no"}]),
    dict(BASE, input=[{"type": "function_call_output", "output": "x"}]),
    dict(BASE, max_output_tokens=0), dict(BASE, temperature=3), dict(BASE, top_p=-1),
    dict(BASE, tools=[{"type": "function"}]), dict(BASE, tools=[dict(WEATHER, parameters=5)]),
    dict(BASE, tool_choice="required"),
    dict(BASE, tools=[WEATHER], tool_choice={"type": "function", "name": "x"}),
    dict(BASE, text={"format": {"type": "xml"}}), dict(BASE, text={"format": {"type": "json_schema"}}),
    dict(BASE, text={"format": {"type": "json_schema", "name": "x", "strict": True,
                                "schema": {"uniqueItems": True}}}),
    dict(BASE, stream="yes"), dict(BASE, stream_options={"include_obfuscation": False}),
    dict(BASE, metadata=5), dict(BASE, model="nothing:here"),
]


@pytest.mark.parametrize("body", BAD)
def test_bad_bodies_are_4xx_in_openais_shape_and_touch_nothing(node, body):
    before = tree(node.models_dir)
    r = requests.post(node.url + "/v1/responses", json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "code"}
    assert tree(node.models_dir) == before


JSON = (st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.floats(allow_nan=False)
        | st.text(max_size=12))
PART = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image", "x"])},
                             optional={"text": st.text(max_size=10) | JSON})
ITEM = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning"]) | JSON,
    "role": st.sampled_from(["user", "assistant", "system", "developer", "x"]),
    "content": st.text(max_size=10) | st.lists(PART, max_size=2) | JSON, "call_id": JSON,
    "name": JSON, "arguments": st.just("{}") | JSON, "output": st.text(max_size=5) | JSON})
FUZZ = st.fixed_dictionaries({"model": st.sampled_from([TINY, "x:1"]) | JSON}, optional={
    "input": st.text(max_size=20) | st.lists(ITEM, max_size=3) | JSON, "instructions": JSON,
    "max_output_tokens": st.integers(-1, 3) | JSON, "temperature": JSON, "top_p": JSON,
    "stream": st.booleans() | JSON, "tools": st.lists(st.just(WEATHER) | JSON, max_size=2) | JSON,
    "tool_choice": st.sampled_from(["auto", "none", "required", "x"]) | JSON,
    "text": st.fixed_dictionaries({"format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "x"])},
        optional={"schema": st.just({"type": "object"}) | JSON})}) | JSON,
    "store": JSON, "parallel_tool_calls": JSON, "metadata": JSON})


def test_fuzzed_bodies_never_get_a_5xx(node):
    seen = []

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(FUZZ)
    def check(body):
        seen.append(post_without_5xx(node.url, "/v1/responses", body))

    check()
    assert requests.get(node.url + "/health", timeout=5).status_code == 200
    print("/v1/responses fuzzing: %d bodies, %d answered 200" % (len(seen), seen.count(200)))


# -- the user's scenarios and the repair errors, in this dialect -------------------------------------

def test_scenario_1_a_corrupted_model_is_repaired_and_answered(node, client):
    layer, blob, repairs = corrupt(node)
    r = client.responses.create(model=TINY, input="test", max_output_tokens=4)
    assert r.object == "response" and r.model == TINY and r.output[0].type == "message"
    assert "sha256:" + hashlib.sha256(open(blob, "rb").read()).hexdigest() == layer["digest"]
    assert node.log().count("Starting auto-repair for model: gpt-oss:7b") == repairs + 1


def test_scenario_2_five_concurrent_requests_share_one_repair(node, client):
    results, served, size = concurrent_answers(node, 5, lambda: client.responses.create(
        model=TINY, input="test", max_output_tokens=4))
    assert [getattr(r, "object", r) for r in results] == ["response"] * 5
    assert served == size


CODES = {"unreachable": ("repair_failed", "model_repair_error"),
         "slow": ("repair_timeout", "gateway_timeout"),
         "disk-full": ("storage_full", "insufficient_storage"),
         "disabled": ("model_corrupted", "model_corrupted")}


@pytest.mark.parametrize("kind, status, message", FAULTS, ids=[f[0] for f in FAULTS])
@pytest.mark.parametrize("stream", [False, True])
def test_repair_errors_are_the_spec_errors(serve, registry, mount_tmpfs, kind, status, message, stream):
    body = {"model": TINY, "input": "test", "max_output_tokens": 2, "stream": stream}
    r = repair_fault(kind, serve, registry, mount_tmpfs, "/v1/responses", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == CODES[kind] and message in err["message"]
