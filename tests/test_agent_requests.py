"""The coding agents' real requests (tests/agents/, recorded from Claude Code 2.1.328 and Codex
0.169.0 with long texts trimmed and ids zeroed, tool lists whole) are answered by the node as
sent, and every tool they declare can be called: its schema makes a grammar."""

import json
import os

import pytest
import requests

from tests.conftest import agents_fixture

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agents")
# Each recorded request: NAME.json its body, NAME.request.json the path (with its query) and the
# headers the agent sent.
REQUESTS = ["claude_code_messages", "claude_code_messages_tool_result", "codex_responses",
            "codex_responses_tool_outputs"]


def recorded(name):
    """(body, path, headers) of a recorded request."""
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        body = json.load(f)
    with open(os.path.join(FIXTURES, name + ".request.json")) as f:
        request = json.load(f)
    return body, request["path"], request["headers"]


node = agents_fixture()


def post(node, path, body, headers):
    """POST as the agent did; (status, whole body text). A dropped connection (the node died)
    fails with the node's log."""
    try:
        r = requests.post(node.url + path, data=json.dumps(body), headers=headers, timeout=300)
    except requests.ConnectionError:
        pytest.fail("the node dropped the connection:\n%s" % node.log()[-3000:])
    return r.status_code, r.text


def assert_answered(status, text, node):
    assert status == 200, text
    # An error after the stream's head: Anthropic's `error` event, the Responses API's
    # `response.failed` or `error` events.
    for mark in ("event: error", '"type": "error"', "response.failed"):
        assert mark not in text, text
    assert node.proc.poll() is None, node.log()[-3000:]


@pytest.mark.parametrize("name", REQUESTS)
def test_the_recorded_request_is_answered(node, name):
    body, path, headers = recorded(name)
    assert body["stream"] is True  # as both agents send every request
    status, text = post(node, path, body, headers)
    assert_answered(status, text, node)
    last = "message_stop" if path.startswith("/v1/messages") else "response.completed"
    assert last in text.strip().split("\n\n")[-1], text


def anthropic_tool_names():
    body, _, _ = recorded("claude_code_messages")
    return [t["name"] for t in body["tools"]]


@pytest.mark.parametrize("tool", anthropic_tool_names())
def test_each_claude_code_tool_can_be_called(node, tool):
    """Forcing a call of each tool, offered alone (a short prompt), makes the node turn its
    input_schema into a grammar and sample under it (Workflow's has a property with no type, any
    JSON value, and a maxLength of 524288). One token is enough for that; a grammar-constrained
    token costs a tenth of a second or more on SmolLM2's 49k vocabulary."""
    body, path, headers = recorded("claude_code_messages")
    body = {"model": body["model"], "max_tokens": 1, "tools": [t for t in body["tools"] if t["name"] == tool],
            "tool_choice": {"type": "tool", "name": tool},
            "messages": [{"role": "user", "content": "Call the tool."}]}
    status, text = post(node, path, body, headers)
    assert_answered(status, text, node)
    answer = json.loads(text)
    assert answer["stop_reason"] == "max_tokens" and answer["usage"]["output_tokens"] == 1, answer


def codex_function_tools():
    body, _, _ = recorded("codex_responses")
    return [t["name"] for t in body["tools"] if t.get("type") == "function"]


@pytest.mark.parametrize("tool", codex_function_tools())
def test_each_codex_function_tool_can_be_called(node, tool):
    body, path, headers = recorded("codex_responses")
    body = {"model": body["model"], "max_output_tokens": 1,
            "tools": [t for t in body["tools"] if t.get("name") == tool],
            "tool_choice": {"type": "function", "name": tool}, "input": "Call the tool."}
    headers = dict(headers, accept="application/json")
    status, text = post(node, path, body, headers)
    assert_answered(status, text, node)
    answer = json.loads(text)
    assert answer["status"] == "incomplete" and answer["usage"]["output_tokens"] == 1, answer
