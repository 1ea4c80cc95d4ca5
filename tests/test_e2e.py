"""The node as a user runs it: `python llmnode.py serve` in a subprocess, curl and the OpenAI
client, /health, and the log lines in the log file."""

import json
import subprocess

import openai
import requests

from tests.conftest import MODEL, node_env

SPEC_CURL_BODY = '''{
    "model": "gpt-oss:7b",
    "messages": [{"role": "user", "content": "Hello"}]
  }'''


def curl_chat(url, body=SPEC_CURL_BODY):
    """The quickstart's curl request, verbatim but for the port."""
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-X", "POST",
                          url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=120)
    body, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(body)


def test_the_quickstart_curl_request_is_answered(pulled, registry, start_node):
    node = start_node(node_env(pulled, registry.url, LLM_CTX_SIZE=256))
    status, body = curl_chat(node.url)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] > 0


def test_the_openai_client_works_streaming_and_not(pulled, registry, start_node):
    node = start_node(node_env(pulled, registry.url))
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, max_tokens=5,
                                           messages=[{"role": "user", "content": "Hello"}])
    assert reply.model == MODEL and reply.usage.completion_tokens <= 5
    assert isinstance(reply.choices[0].message.content, str)
    # The random weights may well pick end-of-text (token 2) within 5 tokens: it is barred, so
    # the stream runs its budget.
    stream = client.chat.completions.create(model=MODEL, max_tokens=5, stream=True, logit_bias={"2": -100},
                                            messages=[{"role": "user", "content": "Hello"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    try:
        client.chat.completions.create(model="absent:1", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("expected a 404")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found"


def test_health_answers_ok(pulled, registry, start_node):
    node = start_node(node_env(pulled, registry.url))
    r = requests.get(node.url + "/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok", "repairs": []}


def test_log_lines_also_go_to_the_log_file(pulled, registry, start_node, tmp_path):
    log_file = tmp_path / "logs" / "llm-node.log"
    node = start_node(node_env(pulled, registry.url, LLM_LOG_FILE=log_file))
    assert requests.get(node.url + "/health", timeout=5).status_code == 200
    assert "[INFO] llmnode serving on " + node.url in log_file.read_text()


