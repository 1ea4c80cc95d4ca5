"""The node as a user runs it: `python llmnode.py serve` in a subprocess, curl and the OpenAI client."""

import json
import os
import subprocess

import openai
import requests

from tests.conftest import MODEL, node_env, run_cli

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


def test_pull_logs_progress_and_list_shows_the_model(pulled, registry, models_dir, tmp_path):
    again = run_cli("pull", MODEL, env=node_env(str(tmp_path / "fresh"), registry.url))
    assert again.returncode == 0
    assert "[INFO] Downloading model: gpt-oss:7b (100%)" in again.stderr
    listing = run_cli("list", env=node_env(pulled, registry.url))
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert listing.stdout.splitlines()[1].startswith(MODEL)


def test_pull_of_an_unknown_model_fails_with_the_cause(registry, models_dir):
    result = run_cli("pull", "absent:1", env=node_env(models_dir, registry.url))
    assert result.returncode == 1
    assert "model not found in registry" in result.stderr


def test_an_invalid_setting_stops_the_node_naming_the_variable(models_dir, registry):
    result = run_cli("serve", env=node_env(models_dir, registry.url, LLM_REPAIR_TIMEOUT_SECS="soon"))
    assert result.returncode == 2
    assert "LLM_REPAIR_TIMEOUT_SECS" in result.stderr


def test_log_lines_also_go_to_the_log_file(pulled, registry, start_node, tmp_path):
    log_file = tmp_path / "logs" / "llm-node.log"
    node = start_node(node_env(pulled, registry.url, LLM_LOG_FILE=log_file))
    assert requests.get(node.url + "/health", timeout=5).status_code == 200
    assert "[INFO] llmnode serving on " + node.url in log_file.read_text()


def test_verify_finds_a_corrupted_blob_and_repair_fixes_it(pulled, registry):
    env = node_env(pulled, registry.url)
    assert run_cli("verify", env=env).returncode == 0
    manifest = json.load(open(os.path.join(pulled, "manifests", "registry.ollama.ai", "library",
                                           "gpt-oss", "7b")))
    digest = manifest["layers"][0]["digest"]
    blob = os.path.join(pulled, "blobs", digest.replace(":", "-"))
    st = os.stat(blob)
    with open(blob, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\0" * 64)
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = run_cli("verify", MODEL, env=env)
    assert bad.returncode == 1
    assert "%s  %s  CORRUPTED: sha256 mismatch" % (MODEL, digest) in bad.stdout
    fixed = run_cli("repair", MODEL, env=env)
    assert fixed.returncode == 0 and "1 blob(s) repaired" in fixed.stdout
    assert run_cli("verify", MODEL, env=env).returncode == 0
