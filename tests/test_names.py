import pytest

from repair import names
from repair.errors import InvalidModelName


@pytest.mark.parametrize("name, parts", [
    ("gpt-oss:7b", ("registry.ollama.ai", "library", "gpt-oss", "7b")),
    ("llama3", ("registry.ollama.ai", "library", "llama3", "latest")),
    ("me/tiny:q4_0", ("registry.ollama.ai", "me", "tiny", "q4_0")),
    ("127.0.0.1:5000/library/tiny:v1.2", ("127.0.0.1:5000", "library", "tiny", "v1.2")),
    ("Example.COM/ns/m", ("example.com", "ns", "m", "latest")),
])
def test_names_expand_to_host_namespace_model_tag(name, parts):
    assert names.parse(name).path_parts == parts


def test_short_form_leaves_out_default_host_and_namespace():
    assert str(names.parse("registry.ollama.ai/library/gpt-oss:7b")) == "gpt-oss:7b"
    assert str(names.parse("me/tiny")) == "me/tiny:latest"
    assert str(names.parse("h:1/a/b:c")) == "h:1/a/b:c"


@pytest.mark.parametrize("name", [
    "", "../etc/passwd", "a/../../b", "/abs/path", "..", "model:..", "model:../x",
    "%2e%2e/x", "a/b/c/d", "m\x00", "m:tag:more", "-dash", "host:99999/a/b",
    "a b", "x" * 5000, "m:", ":tag", "a//b", "ns/.hidden", "C:\\windows",
])
def test_other_shapes_are_refused(name):
    with pytest.raises(InvalidModelName):
        names.parse(name)


def test_non_strings_are_refused():
    with pytest.raises(InvalidModelName):
        names.parse(None)
