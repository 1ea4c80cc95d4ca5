"""CORS on a real waitress over the tiny model: preflights answered on every route, the allow
header on answers and streams for allowed origins only, LLM_API_KEY still needed past the
preflight, and LLM_CORS_ORIGINS's syntax."""

import json
import re
import shutil
import subprocess
import tempfile
import threading

import pytest
import requests

import conf
import llmnode

PAGE = "http://localhost:5173"  # a dev server's page: a loopback origin, allowed by default
CHAT = {"model": "gpt-oss:7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def preflight(url, path, origin, method="POST", headers="content-type, authorization"):
    return requests.options(url + path, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers})


def test_a_preflight_from_an_allowed_origin_gets_the_methods_and_headers(serve):
    s = serve()
    r = preflight(s.url, "/v1/chat/completions", PAGE)
    assert r.status_code == 204 and r.content == b""
    assert r.headers["Access-Control-Allow-Origin"] == PAGE and "Origin" in r.headers["Vary"]
    methods = set(re.split(r",\s*", r.headers["Access-Control-Allow-Methods"]))
    assert {"GET", "POST", "DELETE", "OPTIONS"} <= methods
    assert r.headers["Access-Control-Allow-Headers"] == "content-type, authorization"


@pytest.mark.parametrize("origin", ["http://evil.example", "https://localhost.evil.example",
                                    "http://127.0.0.1.evil.example:80", "null"])
def test_a_disallowed_origin_gets_no_allow_header(serve, origin):
    s = serve()
    r = preflight(s.url, "/v1/chat/completions", origin)
    assert "Access-Control-Allow-Origin" not in r.headers
    assert "Access-Control-Allow-Methods" not in r.headers
    r = requests.post(s.url + "/v1/chat/completions", json=CHAT, headers={"Origin": origin}, timeout=60)
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("origin", ["http://localhost", "http://127.0.0.1:8080", "https://[::1]:3000",
                                    "http://LOCALHOST:1"])
def test_the_loopback_origins_are_allowed_by_default(serve, origin):
    r = preflight(serve().url, "/api/chat", origin)
    assert r.headers["Access-Control-Allow-Origin"] == origin


def test_a_streamed_answer_carries_the_allow_header(serve):
    s = serve()
    r = requests.post(s.url + "/v1/chat/completions", json=dict(CHAT, stream=True),
                      headers={"Origin": PAGE}, stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Access-Control-Allow-Origin"] == PAGE
    assert r.text.rstrip().endswith("data: [DONE]")
    r = requests.post(s.url + "/api/chat", json={"model": "gpt-oss:7b", "messages": CHAT["messages"],
                                                  "options": {"num_predict": 3}},
                      headers={"Origin": PAGE}, stream=True, timeout=60)
    assert r.headers["Access-Control-Allow-Origin"] == PAGE
    assert json.loads(r.text.splitlines()[-1])["done"] is True


def test_every_route_answers_a_preflight(serve):
    s = serve()
    paths = {re.sub(r"<[^>]+>", "gpt-oss:7b", path) for _method, path, *_rest in llmnode.ROUTES}
    assert {"/v1/rerank", "/tokenize", "/v1/messages", "/api/embed", "/health"} <= paths
    for path in sorted(paths):
        r = preflight(s.url, path, PAGE)
        assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == PAGE, path


def test_the_api_key_still_applies_past_the_preflight(serve):
    s = serve(LLM_API_KEY="sekrit")
    r = preflight(s.url, "/v1/chat/completions", PAGE)
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == PAGE
    r = requests.post(s.url + "/v1/chat/completions", json=CHAT, headers={"Origin": PAGE}, timeout=60)
    # Refused, and readable by the page: it can tell the user the key is missing.
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == PAGE
    r = requests.post(s.url + "/v1/chat/completions", json=CHAT, timeout=60,
                      headers={"Origin": PAGE, "Authorization": "Bearer sekrit"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == PAGE


def test_a_star_allows_any_origin_and_empty_allows_none(serve):
    anyone = serve(LLM_CORS_ORIGINS="*")
    r = requests.post(anyone.url + "/v1/chat/completions", json=CHAT,
                      headers={"Origin": "https://app.example"}, timeout=60)
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    nobody = serve(LLM_CORS_ORIGINS="")
    assert "Access-Control-Allow-Origin" not in preflight(nobody.url, "/v1/models", PAGE).headers


def test_listed_origins_and_wildcards(serve):
    s = serve(LLM_CORS_ORIGINS="https://app.example, https://*.corp.example")
    assert preflight(s.url, "/v1/models", "https://app.example").headers[
        "Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight(s.url, "/v1/models", "https://wiki.corp.example").headers[
        "Access-Control-Allow-Origin"] == "https://wiki.corp.example"
    for origin in ("https://app.example:8443", "http://app.example", PAGE):
        assert "Access-Control-Allow-Origin" not in preflight(s.url, "/v1/models", origin).headers


@pytest.mark.parametrize("value", ["localhost", "http://", "http://a.example/path", "ftp"])
def test_a_malformed_origin_setting_is_refused_naming_the_variable(value):
    with pytest.raises(conf.SettingsError, match="LLM_CORS_ORIGINS"):
        conf.load(environ={"LLM_CORS_ORIGINS": value})


PAGE_HTML = """<!doctype html><html><body>waiting<script>
fetch("%s/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json",
      "Authorization": "Bearer sekrit"}, body: JSON.stringify(%s)})
  .then(r => r.json())
  .then(j => { document.body.textContent = "answer:" + j.choices[0].message.role; })
  .catch(e => { document.body.textContent = "refused:" + e; });
</script></body></html>"""


def page_server(html):
    """A page on its own loopback port (another origin than the node's)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def browse(url):
    """The page's DOM once headless Chromium has run its script (and its fetch) to the end."""
    done = subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                           "--user-data-dir=" + tempfile.mkdtemp(), "--virtual-time-budget=60000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return done.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
@pytest.mark.parametrize("origins, seen", [("loopback", "answer:assistant"),
                                           ("https://app.example", "refused:")])
def test_a_real_browser_page_on_another_origin_calls_the_node(serve, origins, seen):
    s = serve(LLM_API_KEY="sekrit", LLM_CORS_ORIGINS=origins)
    page = page_server(PAGE_HTML % (s.url, json.dumps(CHAT)))
    try:
        dom = browse("http://127.0.0.1:%d/" % page.server_address[1])
    finally:
        page.shutdown()
        page.server_close()
    assert seen in dom, dom
