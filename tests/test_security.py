"""The default bind stays on loopback; LLM_API_KEY guards every route but /health; registry
credentials never reach logs or a redirect's host."""

import base64
import os

import requests

import conf
from tests.conftest import node_env, run_cli
from tests.fakeregistry import FakeRegistry

SECRET = "s3cret-pa55"


def test_the_default_bind_is_loopback(pulled, registry, start_node):
    assert conf.load(environ={}).host == "127.0.0.1"
    node = start_node(node_env(pulled, registry.url))
    assert node.url.startswith("http://127.0.0.1:")


def test_an_api_key_guards_everything_but_health(pulled, registry, start_node):
    node = start_node(node_env(pulled, registry.url, LLM_API_KEY=SECRET))
    chat = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for method, path, body in [("get", "/v1/models", None), ("post", "/v1/chat/completions", chat),
                               ("get", "/metrics", None), ("get", "/nowhere", None)]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET}):
            r = requests.request(method, node.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "unauthorized"
    ok = {"Authorization": "Bearer " + SECRET}
    assert requests.get(node.url + "/v1/models", headers=ok, timeout=5).status_code == 200
    r = requests.post(node.url + "/v1/chat/completions", json=chat, headers=ok, timeout=30)
    assert r.status_code == 200
    assert requests.get(node.url + "/health", timeout=5).status_code == 200
    assert SECRET not in node.log()


def test_registry_credentials_go_to_the_token_endpoint_only_and_are_never_logged(
        registry, models_dir, tmp_path):
    cdn = FakeRegistry().start()
    try:
        cdn.blobs.update(registry.blobs)
        registry.require_token = True
        registry.redirect_blobs_to = cdn.url
        log_file = tmp_path / "node.log"
        env = node_env(models_dir, registry.url, LLM_REGISTRY_CREDENTIALS="me:" + SECRET,
                       LLM_LOG_FILE=log_file)
        result = run_cli("pull", "gpt-oss:7b", env=env)
        assert result.returncode == 0, result.stderr
        basic = "Basic " + base64.b64encode(("me:" + SECRET).encode()).decode()
        token_requests = [h for p, h in registry.requests if p.startswith("/token")]
        assert token_requests and all(h.get("Authorization") == basic for h in token_requests)
        assert all("Authorization" not in h for _, h in cdn.requests)
        registry.always = ("status", 401)
        for blob in os.listdir(os.path.join(models_dir, "blobs")):
            os.unlink(os.path.join(models_dir, "blobs", blob))
        failed = run_cli("pull", "gpt-oss:7b", env=env)
        assert failed.returncode == 1
        for text in (result.stderr, result.stdout, failed.stderr, failed.stdout, log_file.read_text()):
            assert SECRET not in text and basic.split()[1] not in text
        bad = run_cli("serve", env=dict(env, LLM_PORT="http"))
        assert SECRET not in bad.stderr
    finally:
        cdn.stop()


def test_secrets_are_masked_when_settings_are_shown():
    s = conf.load(environ={"LLM_API_KEY": SECRET, "LLM_REGISTRY_CREDENTIALS": "me:" + SECRET})
    assert SECRET not in repr(s)
