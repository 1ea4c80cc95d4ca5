"""The coding agents, as they ship on npm, finish a task against the node (`tox -e agents`):
Claude Code on the Anthropic Messages route, Codex on the Responses route, each set up only with
the node's address and the model's name (and a dummy key / the provider entry)."""

import re

import requests

from tests.agentrun import claude_result, run_claude, run_codex
from tests.conftest import SMOL, agents_fixture

TASK = "Say hello"
# What the node logs when it answers an API request with an error (api_call), and when it meets
# an exception it did not expect (bottle_error).
ERROR_LINE = re.compile(r"-> [45]\d\d |unhandled error")


node = agents_fixture()


def answered(node, endpoint):
    """How many requests the node counted on `endpoint`."""
    text = requests.get(node.url + "/metrics", timeout=10).text
    m = re.search(r'llmnode_endpoint_requests_total\{endpoint="%s"\} (\d+)' % re.escape(endpoint), text)
    return int(m.group(1)) if m else 0


def errors_logged(node, since):
    return [line for line in node.lines[since:] if ERROR_LINE.search(line)]


def assert_served(node, since, endpoint, before, run):
    """The node is up, logged no error answer for the agent's requests, and did answer some."""
    assert node.proc.poll() is None, "the node died:\n%s" % "".join(node.lines[since:])
    errors = errors_logged(node, since)
    assert not errors, "the node refused the agent:\n%s%r" % ("".join(errors), run)
    assert answered(node, endpoint) > before, run


def test_claude_code_finishes_against_the_node(node, tmp_path):
    since, before = len(node.lines), answered(node, "/v1/messages")
    run = run_claude(node.url, SMOL, str(tmp_path), TASK)
    assert_served(node, since, "/v1/messages", before, run)
    assert run.returncode == 0, run
    result = claude_result(run)
    assert result["type"] == "result" and result["is_error"] is False, run
    assert result["usage"]["input_tokens"] + result["usage"]["cache_read_input_tokens"] > 8000, result


def test_codex_finishes_against_the_node(node, tmp_path):
    since, before = len(node.lines), answered(node, "/v1/responses")
    run = run_codex(node.url, SMOL, str(tmp_path), TASK)
    assert_served(node, since, "/v1/responses", before, run)
    assert run.returncode == 0, run
    # Codex reports a failed or dropped stream on stderr ("ERROR: ...", as it reconnects), and
    # the tokens of a finished turn.
    assert "ERROR" not in run.stderr, run
    assert re.search(r"tokens used\s+[\d,]+", run.stderr), run
