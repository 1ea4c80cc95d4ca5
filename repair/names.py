"""Model names: `[host[:port]/][namespace/]model[:tag]`, validated before any path is built."""

import re
from dataclasses import dataclass

from repair.errors import InvalidModelName

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_LABEL = r"[A-Za-z0-9][A-Za-z0-9-]{0,62}"
_HOST = re.compile(r"%s(?:\.%s)*(?::[0-9]{1,5})?" % (_LABEL, _LABEL))
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
MAX_NAME = 350


@dataclass(frozen=True)
class ModelRef:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def repository(self):
        return "%s/%s" % (self.namespace, self.model)

    @property
    def path_parts(self):
        return (self.host, self.namespace, self.model, self.tag)

    def __str__(self):
        """The short form Ollama shows: default host and namespace left out."""
        if self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE:
            return "%s:%s" % (self.model, self.tag)
        if self.host == DEFAULT_HOST:
            return "%s/%s:%s" % (self.namespace, self.model, self.tag)
        return "%s/%s/%s:%s" % (self.host, self.namespace, self.model, self.tag)


def parse(name):
    """Parse and validate a model name; raise InvalidModelName for any other shape."""
    if not isinstance(name, str) or not name:
        raise InvalidModelName("Model name must be a non-empty string")
    if len(name) > MAX_NAME:
        raise InvalidModelName("Model name is longer than %d characters" % MAX_NAME)
    parts = name.split("/")
    if len(parts) > 3:
        raise InvalidModelName(_shape_message(name))
    host = parts[0] if len(parts) == 3 else DEFAULT_HOST
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    model, sep, tag = parts[-1].partition(":")
    tag = tag if sep else DEFAULT_TAG
    ok = (
        _HOST.fullmatch(host)
        and _PART.fullmatch(namespace)
        and _PART.fullmatch(model)
        and _TAG.fullmatch(tag)
        and _valid_port(host)
    )
    if not ok:
        raise InvalidModelName(_shape_message(name))
    return ModelRef(host.lower(), namespace, model, tag)


def _valid_port(host):
    _, sep, port = host.partition(":")
    return not sep or 0 < int(port) < 65536


def _shape_message(name):
    shown = name if len(name) <= 80 else name[:77] + "..."
    return (
        "Invalid model name %r: expected [host[:port]/][namespace/]model[:tag] "
        "made of letters, digits, '_', '-' and '.'" % shown
    )
