"""The HTTP layer every dialect shares: unknown routes and wrong methods answered in JSON, the
request body limit (413 before the body is read, a body at the limit read, a 150 kB chat past
bottle's own 100 kB default accepted), bodies that are not JSON objects, and /health and /v1/models
answering while a request holds the model; on the tiny model, in process."""

import json
import socket

import pytest
import requests

from tests.conftest import assert_error

CHAT = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def test_unknown_routes_and_wrong_methods_are_json(serve):
    s = serve()
    assert_error(requests.get(s.url + "/nope", timeout=5), 404, "invalid_request_error", "not_found")
    r = requests.get(s.url + "/v1/chat/completions", timeout=5)
    assert_error(r, 405, "invalid_request_error", "method_not_allowed")
    assert "POST" in r.headers["Allow"]


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_bodies_are_400(serve, data):
    r = serve().post("/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_request_error", "invalid_request")


def test_bodies_over_the_limit_are_413_json(serve):
    s = serve(LLM_MAX_BODY_BYTES="2048")
    big = dict(CHAT, messages=[{"role": "user", "content": "x" * 4000}])
    assert_error(s.post("/v1/chat/completions", big), 413, "invalid_request_error", "request_too_large")
    ok = dict(CHAT, messages=[{"role": "user", "content": "x" * 300}])
    assert s.post("/v1/chat/completions", ok).status_code == 200


def test_an_oversized_body_is_refused_before_it_is_read(serve):
    s = serve(LLM_MAX_BODY_BYTES="1024")
    port = int(s.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Announce 300 MiB and send none of it: the answer must come without the body.
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % (300 << 20))
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"application/json" in head
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_body_at_the_limit_is_read(serve):
    s = serve(LLM_MAX_BODY_BYTES="200")
    body = b'{"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}'
    body += b" " * (200 - len(body))
    r = s.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_a_long_chat_over_bottles_100k_default_is_accepted(serve):
    long = dict(CHAT, messages=[{"role": "system", "content": "x" * 150_000},
                                {"role": "user", "content": "hi"}])
    r = serve().post("/v1/chat/completions", long)
    # The body is accepted; the tiny model's 512-token context then refuses the prompt.
    assert_error(r, 400, "invalid_request_error", "context_length_exceeded")


def test_health_does_not_wait_behind_a_generation(serve):
    s = serve()
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    entry = s.node.load("gpt-oss:7b")
    try:
        r = requests.get(s.url + "/health", timeout=5)
        models = requests.get(s.url + "/v1/models", timeout=5)
    finally:
        entry.release()
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert models.status_code == 200


def test_closing_the_server_ends_its_workers_before_the_trigger(serve):
    """A worker still finishing an answer pulls waitress's trigger; closed first, the trigger's file
    number can be taken by the next file opened (a subprocess's error pipe once read b'x' from it),
    so close_server ends the workers first."""
    s = serve()
    assert s.post("/v1/chat/completions", CHAT).status_code == 200
    assert s.server.task_dispatcher.threads  # the workers run
    s.close()
    assert not s.server.task_dispatcher.threads  # every worker has ended
    assert s.server.trigger._closed
