"""llmnode: an OpenAI-compatible LLM node over an Ollama-layout store, on llama.cpp.

The HTTP surface, the model runtime and the command line live here; the store, the
registry client, downloads and repair live in the `repair` package.
"""

import argparse
import hmac
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, deque

import bottle

import conf
from repair import names
from repair.coordinator import RepairCoordinator
from repair.errors import (
    InvalidRequest,
    LLMNodeError,
    MethodNotAllowed,
    ModelLoadFailed,
    PayloadTooLarge,
    RouteNotFound,
    Unauthorized,
)
from repair.guard import IntegrityGuard
from repair.metrics import Metrics
from repair.pull import fetch_broken, pull
from repair.registry import RegistryClient
from repair.scrub import Scrubber
from repair.store import Store, blob_layers, model_layer
from repair.verify import BlobCorrupted

log = logging.getLogger("llmnode")

# How long a request waits for its model to finish another generation before it gives up.
GENERATION_WAIT_SECS = 600


###############################################################################
# Logging #####################################################################
###############################################################################

def configure_logging(log_file=None, level=logging.INFO):
    """`[LEVEL] message` to stderr and, when set, appended to `log_file`."""
    formatter = logging.Formatter("[%(levelname)s] %(message)s")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(level)


###############################################################################
# Runtime #####################################################################
###############################################################################

class ModelBusy(LLMNodeError):
    status = 503
    type = "server_error"
    code = "model_busy"
    retry_after = 5


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


def load_llama(path, settings):
    """Load a GGUF with llama.cpp; its chat template comes from the file."""
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
                 use_mmap=settings.use_mmap, verbose=False)


# byte-fallback tokens can run a generation up to 3 tokens past max_tokens (an unfinished
# UTF-8 character), and llama.cpp fails rather than stops at the end of its context.
CONTEXT_MARGIN = 4


def chat_formatter(llm):
    """The model's own chat template, compiled once per loaded model; None if it has none."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def text(token):
        return llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    return Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()),
                               bos_token=text(llm.token_bos()))


def completion_budget(llm, formatter, messages):
    """Tokens the answer may use: the context less the prompt, as the model's template renders it."""
    if formatter:
        prompt = formatter(messages=messages)
        used = len(llm.tokenize(prompt.prompt.encode("utf-8"), add_bos=not prompt.added_special,
                                special=True))
    else:
        body = "\n".join(m["content"] for m in messages).encode("utf-8")
        used = len(llm.tokenize(body, special=True)) + 16 * len(messages)
    return llm.n_ctx() - used - CONTEXT_MARGIN


class FairLock:
    """A lock handed to its waiters in arrival order: under load no request waits behind ones
    that came after it (threading.Lock picks a waiter at random, which shows in p99 latency)."""

    def __init__(self):
        # Guards _held and _waiters (one Event per waiting thread, oldest first).
        self._mutex = threading.Lock()
        self._held = False
        self._waiters = deque()

    def acquire(self, timeout=None):
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._mutex:
            if turn.is_set():  # handed over just as the wait timed out
                return True
            self._waiters.remove(turn)
            return False

    def release(self):
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()  # ownership passes straight to the oldest waiter
            else:
                self._held = False

    def waiting(self):
        with self._mutex:
            return len(self._waiters)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class LoadedModel:
    def __init__(self, path):
        self.path = path
        self.llm = None
        self.formatter = None
        # Guards `llm`: a llama.cpp context runs one generation at a time, in arrival order.
        self.lock = FairLock()


class ModelPool:
    """Models loaded lazily on first use and kept; the least recently used leaves first."""

    def __init__(self, loader, capacity):
        self.loader = loader
        self.capacity = capacity
        # Guards `_models` (path -> LoadedModel, oldest use first); never held during a load.
        self._lock = threading.Lock()
        self._models = OrderedDict()

    def acquire(self, path, wait=GENERATION_WAIT_SECS):
        """The loaded model for `path` with its lock held; the caller must `release` it."""
        with self._lock:
            entry = self._models.get(path)
            if entry is None:
                entry = self._models[path] = LoadedModel(path)
            self._models.move_to_end(path)
            victims = []
            while len(self._models) > self.capacity:
                victims.append(self._models.popitem(last=False)[1])
        for victim in victims:
            self._unload(victim)
        if not entry.lock.acquire(timeout=wait):
            raise ModelBusy("The model is busy with other requests; try again shortly")
        if entry.llm is None:
            try:
                entry.llm = self.loader(path)
                entry.formatter = chat_formatter(entry.llm)
            except (ValueError, OSError, RuntimeError) as e:
                entry.lock.release()
                self.drop(path)
                raise ModelLoadFailed("Failed to load model file %s: %s"
                                      % (os.path.basename(path), e)) from e
        return entry

    def drop(self, path):
        """Forget a model (its file changed); it is freed once no generation holds it."""
        with self._lock:
            entry = self._models.pop(path, None)
        if entry is not None:
            self._unload(entry)

    def _unload(self, entry):
        with entry.lock:
            if entry.llm is not None:
                entry.llm.close()
                entry.llm = None

    def loaded(self):
        with self._lock:
            return [e.path for e in self._models.values() if e.llm is not None]


###############################################################################
# Node: model resolution and generation #######################################
###############################################################################

class Node:
    """Resolves model names to verified blobs (repairing them) and runs chat completions."""

    def __init__(self, settings, session=None, loader=None):
        self.settings = settings
        self.store = Store(settings.models_dir)
        self.client = RegistryClient(settings.registry_url, settings.insecure_registries,
                                     session=session, credentials=settings.registry_credentials,
                                     timeout=(10.0, float(settings.registry_timeout_secs)))
        self.metrics = Metrics()
        self.guard = IntegrityGuard(self.store, metrics=self.metrics)
        self.repairs = RepairCoordinator(self.store, self.client, self.guard,
                                         auto_repair=settings.auto_repair,
                                         timeout_secs=settings.repair_timeout_secs,
                                         max_waiters=settings.max_repair_waiters,
                                         connections=settings.download_connections,
                                         metrics=self.metrics)
        self.pool = ModelPool(loader or (lambda path: load_llama(path, settings)),
                              settings.max_loaded_models)

    def load(self, name):
        """The loaded model for a name, its lock held: guard, repair if needed, load."""
        ref = names.parse(name)
        resolved = self.repairs.ensure(ref, on_change=self.pool.drop)
        try:
            return self.pool.acquire(resolved.path)
        except ModelLoadFailed as e:
            # llama.cpp refused the file: a full check decides between corruption and a bad model.
            log.warning("model %s failed to load; checking its blob in full", ref)
            if not self.repairs.ensure(ref, on_change=self.pool.drop, full=True).repaired:
                raise ModelLoadFailed("%s; the blob matches its digest, so the model itself "
                                      "cannot be loaded by this llama.cpp" % e) from e
            return self.pool.acquire(resolved.path)

    def models(self):
        data = []
        for ref in self.store.models():
            st = os.stat(self.store.manifest_path(ref))
            data.append({"id": str(ref), "object": "model", "created": int(st.st_mtime),
                         "owned_by": ref.namespace})
        return data

    def chat(self, req):
        """Run a validated chat request; a dict, or an iterator of chunks when streaming."""
        entry = self.load(req["model"])
        params = {k: req[k] for k in ("temperature", "top_p", "stop") if req.get(k) is not None}
        if req.get("seed") is not None:
            params["seed"] = req["seed"] % (2 ** 32)
        try:
            budget = completion_budget(entry.llm, entry.formatter, req["messages"])
            if budget < 1:
                raise ContextTooLong("The prompt does not leave room for an answer in the "
                                     "context of %d tokens (LLM_CTX_SIZE)" % self.settings.n_ctx)
            params["max_tokens"] = min(req["max_tokens"] or budget, budget)
            result = entry.llm.create_chat_completion(messages=req["messages"],
                                                      stream=req["stream"], **params)
            if req["stream"]:
                # Prompt errors surface at the first chunk: take it before the 200 is sent.
                first = next(result, None)
        except ValueError as e:
            entry.lock.release()
            if "exceed context window" in str(e):
                raise ContextTooLong("%s (LLM_CTX_SIZE=%d)" % (e, self.settings.n_ctx)) from e
            raise
        except BaseException:
            entry.lock.release()
            raise
        if not req["stream"]:
            entry.lock.release()
            result["model"] = req["model"]
            return result
        return self._stream(entry, first, result, req["model"])

    @staticmethod
    def _stream(entry, first, chunks, model):
        try:
            for chunk in itertools.chain([first] if first else [], chunks):
                chunk["model"] = model
                yield chunk
        finally:
            entry.lock.release()


###############################################################################
# Request validation ##########################################################
###############################################################################

ROLES = ("system", "user", "assistant", "tool", "developer")


def _number(req, key, low, high):
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest("'%s' must be a number from %s to %s" % (key, low, high))
    return value


def _integer(req, key, low, high):
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest("'%s' must be an integer from %d to %d" % (key, low, high))
    return value


def _content(i, message):
    content = message.get("content")
    if content is None and message["role"] == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise InvalidRequest("'messages[%d].content' must be a string or a list of text parts" % i)


def validate_chat(req, n_ctx):
    """Check a chat completion body; return the fields the runtime uses."""
    if not isinstance(req, dict):
        raise InvalidRequest("The request body must be a JSON object")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string")
    names.parse(model)
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequest("'messages[%d].role' must be one of %s" % (i, ", ".join(ROLES)))
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _content(i, m)})
    stop = req.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise InvalidRequest("'stop' must be a string or an array of up to 4 strings")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false")
    max_tokens = req.get("max_tokens")
    if max_tokens is None:
        max_tokens = req.get("max_completion_tokens")
    return {
        "model": model,
        "messages": clean,
        "max_tokens": _integer({"max_tokens": max_tokens}, "max_tokens", 1, n_ctx),
        "temperature": _number(req, "temperature", 0, 2),
        "top_p": _number(req, "top_p", 0, 1),
        "seed": _integer(req, "seed", -(2 ** 63), 2 ** 64 - 1),
        "stop": stop,
        "stream": stream,
    }


###############################################################################
# HTTP ########################################################################
###############################################################################

def error_response(err):
    """Set the status and headers of an error and return its OpenAI-shaped body."""
    bottle.response.status = err.status
    bottle.response.content_type = "application/json"
    if err.retry_after:
        bottle.response.set_header("Retry-After", str(err.retry_after))
    return json.dumps(err.body())


def make_app(node):
    """The WSGI app: the Bottle routes behind the API key check and the request counter."""
    return guarded(routes(node), node.settings.api_key, node.metrics)


def guarded(app, api_key, metrics):
    """Refuse requests without the API key (but /health), and count answers by status."""
    expected = ("Bearer " + api_key).encode() if api_key else None

    def wsgi(environ, start_response):
        def counting_start_response(status, headers, exc_info=None):
            metrics.inc("llmnode_requests_total", status=status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        if expected and environ.get("PATH_INFO") != "/health":
            given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected):
                err = Unauthorized("Missing or wrong API key: send Authorization: Bearer <LLM_API_KEY>")
                body = json.dumps(err.body()).encode()
                counting_start_response("401 Unauthorized", [
                    ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("WWW-Authenticate", 'Bearer realm="llmnode"')])
                return [body]
        return app(environ, counting_start_response)

    return wsgi


def routes(node):
    """The Bottle app: every answer, errors included, is JSON."""
    app = bottle.Bottle(catchall=True, autojson=True)
    limit = node.settings.max_body_bytes

    def api(handler):
        def wrapper(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except LLMNodeError as e:
                log.log(logging.ERROR if e.status >= 500 else logging.INFO,
                        "%s %s -> %d %s", bottle.request.method, bottle.request.path, e.status, e)
                return error_response(e)
        return wrapper

    def bottle_error(res):
        if res.status_code == 404:
            err = RouteNotFound("Unknown route: %s %s" % (bottle.request.method, bottle.request.path))
        elif res.status_code == 405:
            err = MethodNotAllowed("Method %s is not allowed on %s"
                                   % (bottle.request.method, bottle.request.path))
        elif res.status_code == 413:
            err = PayloadTooLarge("Request body is larger than %d bytes" % limit)
        elif res.status_code < 500:
            err = InvalidRequest(str(res.body) or "Bad request")
            err.status = res.status_code
        else:
            if res.exception is not None:
                log.error("unhandled error on %s %s: %r\n%s", bottle.request.method,
                          bottle.request.path, res.exception, res.traceback)
            err = LLMNodeError("Internal server error")
        return error_response(err)

    app.default_error_handler = bottle_error

    def read_json():
        if bottle.request.content_length > limit:
            raise PayloadTooLarge("Request body is larger than %d bytes" % limit)
        raw = bottle.request.body.read(limit + 1)
        if len(raw) > limit:
            raise PayloadTooLarge("Request body is larger than %d bytes" % limit)
        if not raw.strip():
            raise InvalidRequest("The request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest("The request body is not valid JSON: %s" % e) from None

    @app.get("/health")
    def health():
        return {"status": "ok", "repairs": node.repairs.active()}

    @app.get("/metrics")
    def metrics():
        bottle.response.content_type = "text/plain; version=0.0.4"
        return node.metrics.render()

    @app.get("/v1/models")
    @api
    def list_models():
        return {"object": "list", "data": node.models()}

    @app.post("/v1/chat/completions")
    @api
    def chat_completions():
        req = validate_chat(read_json(), node.settings.n_ctx)
        started = time.monotonic()
        result = node.chat(req)
        if not req["stream"]:
            log.info("chat %s: %d tokens in %.2fs", req["model"],
                     result["usage"]["completion_tokens"], time.monotonic() - started)
            return result
        bottle.response.content_type = "text/event-stream"
        bottle.response.set_header("Cache-Control", "no-cache")
        return sse(result)

    return app


def sse(chunks):
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`."""
    try:
        for chunk in chunks:
            yield "data: %s\n\n" % json.dumps(chunk)
    except Exception as e:
        log.exception("stream failed")
        yield "data: %s\n\n" % json.dumps(LLMNodeError("Stream failed: %s" % e).body())
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    yield "data: [DONE]\n\n"


###############################################################################
# Command line ################################################################
###############################################################################

def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conf", default=argparse.SUPPRESS,
                        help="conf file with an [llmnode] section (env LLM_CONFIG)")
    for s in conf.SETTINGS:
        common.add_argument("--" + s.key.replace("_", "-"), dest=s.key, default=argparse.SUPPRESS,
                            metavar=s.key.upper(),
                            help="%s (env %s, default %r)" % (s.meaning, s.env, s.default))
    parser = argparse.ArgumentParser(prog="llmnode.py", parents=[common],
                                     description="An OpenAI-compatible LLM node that repairs "
                                                 "its own corrupted model files.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", parents=[common], help="serve the HTTP API (the default)")
    p = sub.add_parser("pull", parents=[common], help="download a model from its registry")
    p.add_argument("name")
    sub.add_parser("list", parents=[common], help="models in the store")
    p = sub.add_parser("verify", parents=[common],
                       help="full sha256 check of every blob (or one model's); exit 1 if any is bad")
    p.add_argument("name", nargs="?")
    p = sub.add_parser("repair", parents=[common],
                       help="verify a model and download whatever is corrupted or missing")
    p.add_argument("name")
    sub.add_parser("demo", parents=[common],
                   help="the auto-repair story offline, on a tiny model and a throwaway registry")
    return parser


def cmd_serve(settings):
    import waitress

    node = Node(settings)
    node.store.ensure_dirs()
    for path in node.store.remove_temporaries():
        log.info("removed %s, left by an interrupted write", path)
    server = waitress.create_server(make_app(node), host=settings.host, port=settings.port,
                                    threads=settings.threads, ident="llmnode",
                                    clear_untrusted_proxy_headers=True)
    if settings.scrub_interval_secs:
        Scrubber(node.store, node.guard, node.repairs, settings.scrub_interval_secs,
                 on_change=node.pool.drop).start()
    log.info("llmnode serving on http://%s:%s (store %s)", server.effective_host,
             server.effective_port, settings.models_dir)
    try:
        server.run()
    except KeyboardInterrupt:
        log.info("llmnode stopping")
    finally:
        server.close()
    return 0


def cmd_pull(settings, name):
    node = Node(settings)
    ref = names.parse(name)
    log.info("pulling %s", ref)
    pull(node.client, node.store, node.guard, ref, connections=settings.download_connections)
    print("pulled %s" % ref)
    return 0


def cmd_verify(settings, name):
    """Full check of every blob; print each problem; exit 1 if any."""
    node = Node(settings)
    refs = [names.parse(name)] if name else node.store.models()
    bad = 0
    for ref in refs:
        try:
            manifest = node.store.read_manifest(ref)
        except LLMNodeError as e:
            print("%s  manifest  BAD: %s" % (ref, e))
            bad += 1
            continue
        weights = model_layer(manifest)
        for layer in blob_layers(manifest):
            try:
                node.guard.verify(layer, gguf=layer is weights)
                print("%s  %s  ok" % (ref, layer["digest"]))
            except BlobCorrupted as e:
                print("%s  %s  CORRUPTED: %s" % (ref, layer["digest"], e.reason))
                bad += 1
    print("%d model(s) checked, %d problem(s)" % (len(refs), bad))
    return 1 if bad else 0


def cmd_repair(settings, name):
    """Fetch the manifest again if it is missing or unusable, then every bad blob."""
    node = Node(settings)
    ref = names.parse(name)
    manifest = node.repairs.manifest(ref)
    fetched = fetch_broken(node.client, node.store, node.guard, ref, manifest,
                           connections=settings.download_connections)
    print("%s: %s" % (ref, "%d blob(s) repaired" % len(fetched) if fetched else "intact"))
    return 0


def cmd_list(settings):
    store = Store(settings.models_dir)
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    for ref in store.models():
        try:
            layer = model_layer(store.read_manifest(ref))
        except LLMNodeError as e:
            rows.append((str(ref), "-", "-", "manifest unreadable: %s" % e))
            continue
        mtime = os.stat(store.manifest_path(ref)).st_mtime
        rows.append((str(ref), layer["digest"][7:19], human_size(layer["size"]),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    return 0


def human_size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return "%d %s" % (n, unit) if unit == "B" else "%.1f %s" % (n, unit)
        n /= 1000.0
    return "%.1f TB" % n


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command", None) or "serve"
    conf_path = args.pop("conf", None)
    name = args.pop("name", None)
    try:
        settings = conf.load(conf_path=conf_path, flags=args)
    except (conf.SettingsError, OSError) as e:
        print("llmnode: %s" % e, file=sys.stderr)
        return 2
    configure_logging(settings.log_file)
    try:
        if command == "serve":
            return cmd_serve(settings)
        if command == "pull":
            return cmd_pull(settings, name)
        if command == "verify":
            return cmd_verify(settings, name)
        if command == "repair":
            return cmd_repair(settings, name)
        if command == "demo":
            from repair.demo import run_demo
            return run_demo(settings)
        return cmd_list(settings)
    except LLMNodeError as e:
        log.error("%s failed: %s", command, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
