"""The settings table: every key's name, environment variable, type, default and meaning."""

import configparser
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a value it cannot take; the message names the variable."""


def as_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def as_int(low, high, expected):
    """The converter to a whole number from `low` to `high` (no bound above when None);
    `expected` says what else is refused."""
    def convert(text):
        value = int(text.strip())
        if value < low or (high is not None and value > high):
            raise ValueError(expected)
        return value
    return convert


as_positive_int = as_int(1, None, "expected a whole number of at least 1")
as_non_negative_int = as_int(0, None, "expected 0 or a positive whole number")
as_connections = as_int(1, 16, "expected a number of connections from 1 to 16")
as_port = as_int(0, 65535, "expected a port number 0-65535")


def as_cpu_threads(text):
    return as_int(0, None, "expected 0 (one per core) or a positive number")(text) or usable_cores()


def usable_cores(affinity=None, cgroup_root="/sys/fs/cgroup"):
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota
    (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded down, at least 1.
    A container given 2 of a host's 64 cores gets 2 threads, not 64 that the quota throttles."""
    try:
        cores = len((affinity or os.sched_getaffinity)(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def _cgroup_quota(root):
    """The CPU quota in cores of the cgroup under `root`; None when unlimited or unknown."""
    def read(*parts):
        try:
            with open(os.path.join(root, *parts)) as f:
                return f.read().split()
        except (OSError, ValueError):
            return None

    v2 = read("cpu.max")
    if v2 and len(v2) == 2 and v2[0] != "max":
        return int(v2[0]) / int(v2[1])
    quota, period = read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")
    if quota and period and int(quota[0]) > 0:
        return int(quota[0]) / int(period[0])
    return None


def as_gpu_layers(text):
    """`auto` (every layer when llama.cpp has a GPU backend, else none), or a count."""
    if text.strip().lower() == "auto":
        return None
    return as_int(0, None, "expected auto or a number of layers (0 or more)")(text)


def as_choice(*choices):
    def convert(text):
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of %s" % ", ".join(choices))
        return value
    return convert


def as_reasoning_budget(text):
    value = as_int(-1, None, "expected -1 (unlimited), 0 (no thinking) or a number of tokens")(text)
    return None if value == -1 else value


def as_optional_secret(text):
    return text.strip() or None


def as_path(text):
    if not text.strip():
        raise ValueError("expected a path")
    return os.path.abspath(os.path.expanduser(text.strip()))


def as_optional_path(text):
    return as_path(text) if text.strip() else None


def as_host_list(text):
    return tuple(h.strip().lower() for h in text.split(",") if h.strip())


def as_origins(text):
    """Comma-separated browser origins (`*` in one matches anything there); `loopback` stands
    for http and https on localhost, 127.0.0.1 and [::1] at any port, as Ollama allows by default."""
    origins = []
    for origin in (o.strip() for o in text.split(",")):
        if origin == "loopback":
            origins += ["%s://%s%s" % (scheme, host, port) for scheme in ("http", "https")
                        for host in ("localhost", "127.0.0.1", "[::1]") for port in ("", ":*")]
        elif origin == "*" or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin or "-"):
            origins.append(origin)
        elif origin:
            raise ValueError("expected origins such as http://localhost:3000, https://*.example.com, "
                             "loopback or *")
    return tuple(origins)


def as_url(text):
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return text.strip().rstrip("/")


def as_name_list(text):
    return tuple(n.strip() for n in text.split(",") if n.strip())


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def as_keep_alive(text):
    """Ollama's keep-alive syntax: seconds or a Go duration (`30s`, `5m`, `1h30m`); negative is
    forever (None), 0 unloads at once."""
    return parse_keep_alive(text.strip())


def parse_keep_alive(value):
    """Seconds (float), or None for forever; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, -1 or 0")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(value)
    text = value.strip() if isinstance(value, str) else ""
    try:
        number = float(text)
        return None if number < 0 else number
    except ValueError:
        pass
    negative = text.startswith("-")
    body = text[1:] if negative else text
    pos, total = 0, 0.0
    for m in _DURATION.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError("expected a duration such as 30s, 5m, -1 or 0")
    return None if negative else total


def as_str(text):
    if not text.strip():
        raise ValueError("expected a value")
    return text.strip()


@dataclass(frozen=True)
class Setting:
    key: str
    env: str
    convert: Callable[[str], object]
    default: str
    meaning: str


SETTINGS = (
    Setting("auto_repair", "LLM_AUTO_REPAIR", as_bool, "true",
            "repair corrupted models automatically on request"),
    Setting("repair_timeout_secs", "LLM_REPAIR_TIMEOUT_SECS", as_positive_int, "300",
            "how long a request waits for a repair, and how long one repair attempt may run"),
    Setting("models_dir", "LLM_MODELS_DIR", as_path, "~/.runtime/models",
            "the model store (Ollama layout; ~/.ollama/models works as is)"),
    Setting("host", "LLM_HOST", as_str, "127.0.0.1",
            "address the API listens on"),
    Setting("port", "LLM_PORT", as_port, "8081",
            "port the API listens on (0 picks a free one)"),
    Setting("registry_url", "LLM_REGISTRY_URL", as_url, "https://registry.ollama.ai",
            "where models whose name has no host are fetched from"),
    Setting("insecure_registries", "LLM_INSECURE_REGISTRIES", as_host_list, "",
            "comma-separated registry hosts that may be reached over plain http"),
    Setting("log_file", "LLM_LOG_FILE", as_optional_path, "",
            "also append the log to this file"),
    Setting("threads", "LLM_THREADS", as_positive_int, "64",
            "HTTP worker threads (waitress)"),
    Setting("max_repair_waiters", "LLM_MAX_REPAIR_WAITERS", as_positive_int, "48",
            "requests that may wait on repairs at once; more get 503 with Retry-After"),
    Setting("registry_timeout_secs", "LLM_REGISTRY_TIMEOUT_SECS", as_positive_int, "30",
            "a registry connection silent this long is dropped and retried"),
    Setting("download_connections", "LLM_DOWNLOAD_CONNECTIONS", as_connections, "4",
            "connections one blob of 128 MiB or more is downloaded over, in parts (1-16)"),
    Setting("registry_credentials", "LLM_REGISTRY_CREDENTIALS", as_optional_secret, "",
            "user:password for the registry (token endpoint and registry host only)"),
    Setting("api_key", "LLM_API_KEY", as_optional_secret, "",
            "when set, every route but /health needs Authorization: Bearer <key>"),
    Setting("cors_origins", "LLM_CORS_ORIGINS", as_origins, "loopback",
            "browser origins answered with CORS headers (comma-separated, `*` wildcards; "
            "loopback: localhost, 127.0.0.1, [::1] at any port; empty: none)"),
    Setting("scrub_interval_secs", "LLM_SCRUB_INTERVAL_SECS", as_non_negative_int, "0",
            "re-verify every blob in the background this often (0: off)"),
    Setting("max_body_bytes", "LLM_MAX_BODY_BYTES", as_positive_int, "8388608",
            "largest request body accepted; larger ones get 413"),
    Setting("max_loaded_models", "LLM_MAX_LOADED_MODELS", as_positive_int, "1",
            "models kept loaded in memory; the least recently used leaves first"),
    Setting("n_ctx", "LLM_CTX_SIZE", as_positive_int, "4096",
            "context size in tokens of each sequence of a loaded model"),
    Setting("embed_ctx_size", "LLM_EMBED_CTX_SIZE", as_positive_int, "8192",
            "most tokens one embedding or rerank input reads (the model's trained context, if "
            "smaller)"),
    Setting("parallel", "LLM_PARALLEL", as_positive_int, "4",
            "sequences each loaded model decodes at once (continuous batching); each keeps its "
            "tokens as a prompt cache"),
    Setting("reasoning_budget", "LLM_REASONING_BUDGET", as_reasoning_budget, "-1",
            "tokens a reasoning model may think before the node closes its thinking block "
            "(-1: unlimited; a request's own budget is capped by it)"),
    Setting("use_mmap", "LLM_USE_MMAP", as_bool, "false",
            "map model files instead of reading them in (faster loads, but a file "
            "truncated under a running generation can crash the node)"),
    Setting("n_threads", "LLM_CPU_THREADS", as_cpu_threads, "0",
            "CPU threads llama.cpp uses for generation (0: one per core this process may use)"),
    Setting("verify_on_load", "LLM_VERIFY_ON_LOAD", as_bool, "true",
            "verify a model's blob every time its weights are loaded from disk"),
    Setting("preload", "LLM_PRELOAD", as_name_list, "",
            "comma-separated models verified and loaded at start; /ready waits for them"),
    Setting("keep_alive", "LLM_KEEP_ALIVE", as_keep_alive, "5m",
            "how long an idle model stays loaded (30s, 10m, -1 forever, 0 unload at once)"),
    Setting("gpu_layers", "LLM_GPU_LAYERS", as_gpu_layers, "auto",
            "layers offloaded to the GPU (auto: all when llama.cpp has a GPU backend, else 0)"),
    Setting("kv_cache_type", "LLM_KV_CACHE_TYPE", as_choice("f16", "q8_0", "q4_0"), "f16",
            "type of the KV cache's keys and values (q8_0 halves its memory, q4_0 quarters it)"),
    Setting("flash_attention", "LLM_FLASH_ATTENTION", as_choice("auto", "on", "off"), "auto",
            "llama.cpp's flash attention (a quantised V cache needs it on or auto)"),
    Setting("prompt_cache_min", "LLM_PROMPT_CACHE_MIN", as_positive_int, "1024",
            "prompts of at least this many tokens are saved to the prompt cache on disk once read"),
    Setting("prompt_cache_bytes", "LLM_PROMPT_CACHE_BYTES", as_non_negative_int, "2147483648",
            "most bytes the prompt cache on disk (.llmnode/kv/ in the store) holds; the least "
            "recently used leave first (0: off)"),
)

BY_KEY = {s.key: s for s in SETTINGS}
CONF_SECTION = "llmnode"


SECRETS = ("registry_credentials", "api_key")


class Settings:
    """Resolved settings; attribute access by key."""

    def __init__(self, values):
        self.__dict__.update(values)

    def __repr__(self):
        shown = {k: ("***" if k in SECRETS and v else v) for k, v in self.__dict__.items()}
        return "Settings(%r)" % (shown,)


def read_conf_file(path):
    """Return the raw key -> text pairs of a conf file, refusing unknown keys."""
    parser = configparser.ConfigParser(interpolation=None)
    with open(path, encoding="utf-8") as f:
        parser.read_file(f)
    if not parser.has_section(CONF_SECTION):
        return {}
    raw = dict(parser.items(CONF_SECTION))
    unknown = sorted(set(raw) - set(BY_KEY))
    if unknown:
        raise SettingsError("%s: unknown setting(s): %s" % (path, ", ".join(unknown)))
    return raw


def load(environ=None, conf_path=None, flags=None):
    """Resolve every setting: CLI flags over environment over conf file over defaults."""
    environ = os.environ if environ is None else environ
    conf_path = conf_path or environ.get("LLM_CONFIG")
    from_file = read_conf_file(conf_path) if conf_path else {}
    flags = flags or {}
    values = {}
    for s in SETTINGS:
        if flags.get(s.key) is not None:
            text, source = flags[s.key], "--" + s.key.replace("_", "-")
        elif s.env in environ:
            text, source = environ[s.env], s.env
        elif s.key in from_file:
            text, source = from_file[s.key], "%s in %s" % (s.key, conf_path)
        else:
            text, source = s.default, s.env
        try:
            values[s.key] = s.convert(text)
        except ValueError as e:
            shown = "***" if s.key in SECRETS else repr(text)
            raise SettingsError("invalid %s=%s: %s" % (source, shown, e)) from None
    settings = Settings(values)
    check_registry_scheme(settings)
    return settings


def is_loopback(host):
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_registry_scheme(settings):
    parts = urlsplit(settings.registry_url)
    if parts.scheme == "http" and not (
        is_loopback(parts.hostname) or parts.hostname in settings.insecure_registries
    ):
        raise SettingsError(
            "invalid LLM_REGISTRY_URL=%r: plain http is allowed only for loopback "
            "or hosts listed in LLM_INSECURE_REGISTRIES" % settings.registry_url
        )
