import pytest
import responses

from repair import names
from repair.errors import DownloadError, RegistryHTTPError
from repair.registry import MANIFEST_ACCEPT, RegistryClient, parse_bearer_challenge
from tests.fakeregistry import TOKEN, FakeRegistry


def test_manifests_are_asked_for_with_docker_and_oci_types(registry):
    raw = RegistryClient(registry.url).get_manifest(names.parse("gpt-oss:7b"))
    assert raw == registry.manifests[("library/gpt-oss", "7b")]
    accept = registry.requests[-1][1]["Accept"]
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept
    assert "application/vnd.oci.image.manifest.v1+json" in accept
    assert accept == MANIFEST_ACCEPT


def test_a_name_with_a_host_goes_to_that_host(registry):
    client = RegistryClient("https://unused.example")
    raw = client.get_manifest(names.parse("%s/library/gpt-oss:7b" % registry.host))
    assert raw == registry.manifests[("library/gpt-oss", "7b")]


def test_anonymous_bearer_challenge_is_answered_with_a_token(registry):
    registry.require_token = True
    client = RegistryClient(registry.url)
    client.get_manifest(names.parse("gpt-oss:7b"))
    client.get_manifest(names.parse("gpt-oss:7b"))
    paths = [p for p, _ in registry.requests]
    assert sum(p.startswith("/token") for p in paths) == 1
    token_request = next(p for p in paths if p.startswith("/token"))
    assert "service=fake" in token_request and "scope=repository%3Alibrary%2Fgpt-oss%3Apull" in token_request
    assert registry.requests[-1][1]["Authorization"] == "Bearer " + TOKEN


def test_blob_redirects_are_followed_without_credentials(registry, tiny_gguf):
    cdn = FakeRegistry().start()
    try:
        cdn.blobs.update(registry.blobs)
        registry.require_token = True
        registry.redirect_blobs_to = cdn.url
        client = RegistryClient(registry.url)
        digest = next(d for d, b in registry.blobs.items() if b == tiny_gguf)
        with client.open_blob(names.parse("gpt-oss:7b"), digest) as resp:
            assert resp.content == tiny_gguf
        assert cdn.requests and all("Authorization" not in h for _, h in cdn.requests)
        assert any(h.get("Authorization") == "Bearer " + TOKEN for _, h in registry.requests)
    finally:
        cdn.stop()


@pytest.mark.parametrize("host, insecure, scheme", [
    ("127.0.0.1:5000", (), "http"),
    ("localhost:5000", (), "http"),
    ("registry.lan:5000", ("registry.lan",), "http"),
    ("registry.lan:5000", (), "https"),
    ("example.com", (), "https"),
])
def test_plain_http_only_for_loopback_and_listed_hosts(host, insecure, scheme):
    client = RegistryClient("https://mirror.example", insecure)
    assert client.base_url(names.parse(host + "/a/b")).startswith(scheme + "://")


def test_names_without_host_go_to_the_mirror():
    client = RegistryClient("http://127.0.0.1:9/")
    assert client.manifest_url(names.parse("gpt-oss:7b")) == \
        "http://127.0.0.1:9/v2/library/gpt-oss/manifests/7b"


def test_missing_model_in_registry_says_so(registry):
    with pytest.raises(RegistryHTTPError) as err:
        RegistryClient(registry.url).get_manifest(names.parse("nope:1"))
    assert err.value.status_code == 404
    assert err.value.message == "Model repair failed: model not found in registry"


@responses.activate
def test_a_redirect_loop_is_an_error():
    url = "https://reg.example/v2/library/m/manifests/latest"
    responses.add(responses.GET, url, status=302, headers={"Location": url})
    with pytest.raises(DownloadError, match="redirect loop"):
        RegistryClient("https://reg.example").get_manifest(names.parse("m"))


def test_bearer_challenge_parsing_keeps_commas_inside_quotes():
    params = parse_bearer_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"')
    assert params == {"realm": "https://auth.example/token", "service": "reg",
                      "scope": "repository:a/b:pull,push"}
    assert parse_bearer_challenge('Basic realm="x"') == {}
