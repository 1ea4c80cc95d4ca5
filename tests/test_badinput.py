"""Careless and hostile clients: every malformed request gets a 4xx OpenAI error, nothing on disk
changes, and the node keeps serving (with property-based fuzzing of the chat body)."""

import json
import os

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import post_without_5xx, tree

GOOD = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

RAW_BODIES = {
    "not json": b"{model: gpt}",
    "empty": b"",
    "whitespace": b"   \n",
    "json array": b"[]",
    "json string": b'"hello"',
    "json null": b"null",
    "bad utf-8": b'{"model": "\xff\xfe"}',
    "truncated": b'{"model": "gpt-oss:7b", "messages": [',
    "nul byte": b'{"model": "gpt\x00oss"}',
}

FIELD_CHANGES = {
    "missing model": {"model": None},
    "model number": {"model": 7},
    "model list": {"model": ["gpt-oss:7b"]},
    "missing messages": {"messages": None},
    "messages object": {"messages": {"role": "user"}},
    "messages empty": {"messages": []},
    "message not object": {"messages": ["hi"]},
    "unknown role": {"messages": [{"role": "root", "content": "x"}]},
    "role missing": {"messages": [{"content": "x"}]},
    "content number": {"messages": [{"role": "user", "content": 1}]},
    "content bad parts": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    "max_tokens huge": {"max_tokens": 10 ** 30},
    "max_tokens negative": {"max_tokens": -5},
    "max_tokens float": {"max_tokens": 2.5},
    "max_tokens bool": {"max_tokens": True},
    "temperature huge": {"temperature": 1e308},
    "temperature string": {"temperature": "hot"},
    "top_p over one": {"top_p": 1.5},
    "seed float": {"seed": 0.5},
    "seed huge": {"seed": 2 ** 80},
    "stop too many": {"stop": ["a", "b", "c", "d", "e"]},
    "stop empty string": {"stop": [""]},
    "stream string": {"stream": "true"},
    "traversal": {"model": "../../../etc/passwd"},
    "traversal in tag": {"model": "gpt-oss:../../x"},
    "url-encoded traversal": {"model": "%2e%2e%2f%2e%2e%2fetc%2fpasswd"},
    "absolute path": {"model": "/etc/passwd"},
    "absolute path with host": {"model": "/root/.ssh/id_rsa:latest"},
    "backslashes": {"model": "..\\..\\windows"},
    "nul in name": {"model": "gpt-oss\x00:7b"},
    "5000-character name": {"model": "m" * 5000},
    "name with spaces": {"model": "gpt oss"},
    "too many slashes": {"model": "a/b/c/d:e"},
}


@pytest.fixture
def node(serve, tmp_path):
    s = serve(LLM_MAX_BODY_BYTES="65536")
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    (sentinel / "keep").write_text("untouched")
    return s


def assert_4xx_and_nothing_touched(s, send, models_dir):
    before = tree(models_dir), tree(os.path.dirname(models_dir))
    r = send()
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["message"]
    assert (tree(models_dir), tree(os.path.dirname(models_dir))) == before
    assert requests.get(s.url + "/health", timeout=5).status_code == 200
    return r


@pytest.mark.parametrize("name", RAW_BODIES)
def test_malformed_bodies(node, models_dir, name):
    assert_4xx_and_nothing_touched(node, lambda: node.post(
        "/v1/chat/completions", data=RAW_BODIES[name], headers={"Content-Type": "application/json"}),
        models_dir)


@pytest.mark.parametrize("name", FIELD_CHANGES)
def test_malformed_fields(node, models_dir, name):
    body = {k: v for k, v in dict(GOOD, **FIELD_CHANGES[name]).items() if v is not None}
    assert_4xx_and_nothing_touched(node, lambda: node.post("/v1/chat/completions", body), models_dir)


@pytest.mark.parametrize("size", [65537, 10 ** 6])
def test_bodies_over_the_limit(node, models_dir, size):
    body = json.dumps(dict(GOOD, messages=[{"role": "user", "content": "x" * size}]))
    r = assert_4xx_and_nothing_touched(node, lambda: node.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}), models_dir)
    assert r.status_code == 413


@pytest.mark.parametrize("path", ["/v1/chat/completions/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                                  "/v1/models/../../../etc", "/blobs/sha256-x"])
def test_odd_paths(node, models_dir, path):
    assert_4xx_and_nothing_touched(node, lambda: requests.get(node.url + path, timeout=5), models_dir)


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer", "root", "", "USER"])
MESSAGE = st.fixed_dictionaries({"role": ROLES}, optional={
    "content": st.text(max_size=60) | JSON_SCALARS | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}), max_size=3),
    "name": JSON_SCALARS})
BODY = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["gpt-oss:7b", "nothing:1", "../x", ""]) | st.text(max_size=30) | JSON_SCALARS,
    "messages": st.lists(MESSAGE, max_size=4) | JSON_SCALARS,
    "max_tokens": st.integers(-3, 6) | JSON_SCALARS,
    "temperature": st.floats(-1, 3, allow_nan=False) | JSON_SCALARS,
    "top_p": st.floats(-1, 2, allow_nan=False) | JSON_SCALARS,
    "stop": st.lists(st.text(max_size=5), max_size=5) | JSON_SCALARS,
    "seed": st.integers() | JSON_SCALARS,
    "stream": st.booleans() | JSON_SCALARS,
    "extra": JSON_SCALARS,
})
# Mostly-valid bodies too, one or two fields changed, so generation itself gets fuzzed.
VALID_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                       "content": st.text(max_size=60)})
NEAR_VALID = st.fixed_dictionaries({}, optional={
    "messages": st.lists(VALID_MESSAGE, min_size=1, max_size=3),
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "seed": st.integers(-(2 ** 63), 2 ** 63),
    "stream": st.booleans(),
}).map(lambda changes: dict(GOOD, **changes))


def test_fuzzed_chat_bodies_never_get_a_5xx(node, models_dir):
    before = tree(os.path.dirname(models_dir))
    seen = []

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(BODY | NEAR_VALID)
    def check(body):
        if isinstance(body.get("max_tokens"), int) or body.get("max_tokens") is None:
            body.setdefault("max_tokens", 2)
        seen.append(post_without_5xx(node.url, "/v1/chat/completions", body))

    check()
    assert requests.get(node.url + "/health", timeout=5).status_code == 200
    records = os.path.join(models_dir, ".llmnode", "verified.json")
    assert [p for p in tree(os.path.dirname(models_dir)) if p[0] != records] == \
        [p for p in before if p[0] != records]
    print("fuzzing: %d bodies, %d answered 200" % (len(seen), seen.count(200)))
