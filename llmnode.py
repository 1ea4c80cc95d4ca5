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
    RepairTimeout,
    RouteNotFound,
    Unauthorized,
)
from repair.guard import IntegrityGuard
from repair.metrics import Metrics
from repair.progress import progress_for
from repair.registry import RegistryClient
from repair.scrub import Scrubber
from repair.store import Store, model_layer

log = logging.getLogger("llmnode")

# How long a request waits for its model to finish another generation before it gives up.
GENERATION_WAIT_SECS = 600
# "No keep-alive given": the model keeps the one it has (LLM_KEEP_ALIVE when first loaded).
KEEP_DEFAULT = object()


###############################################################################
# Logging #####################################################################
###############################################################################

def configure_logging(log_file=None, level=logging.INFO):
    """`[LEVEL] message` to stderr and, when set, appended to `log_file`."""
    formatter = logging.Formatter("[%(levelname)s] %(message)s")
    # Our own copy of stderr: llama.cpp's quiet load points fd 2 at /dev/null for its duration,
    # and the verification running alongside it logs meanwhile.
    try:
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8")
    except (OSError, ValueError, AttributeError):
        stream = sys.stderr
    handlers = [logging.StreamHandler(stream)]
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
    """One model's weights in memory, used by one generation at a time."""

    def __init__(self, pool, path):
        self.pool = pool
        self.path = path
        self.llm = None
        self.formatter = None
        # Guards `llm`: a llama.cpp context runs one generation at a time, in arrival order.
        self.lock = FairLock()
        # The fields below are guarded by the pool's condition.
        self.evicted = False  # leaving memory: whoever holds the lock next must not use `llm`
        self.expires = None  # monotonic time of its idle unload; None while in use or kept
        self.keep_alive = pool.keep_alive  # seconds idle before unload; None: forever
        self.pinned = False  # preloaded: never unloaded for being idle
        self.loaded_at = None  # wall-clock time of the load, for /api/ps
        self.size = 0

    def release(self):
        """End a generation: hand the model to the next request, or let it leave memory."""
        self.pool.release(self)


class ModelPool:
    """Models loaded on first use, at most `capacity` in memory at once (those being loaded and
    those evicted but still finishing a generation count too); the least recently used leaves
    first, and an idle model leaves after its keep-alive."""

    def __init__(self, capacity, keep_alive=300.0, clock=time.monotonic):
        self.capacity = capacity
        self.keep_alive = keep_alive
        self.clock = clock
        # Guards _models (path -> LoadedModel, oldest use first), _live, _reaper and each
        # entry's evicted/expires/keep_alive/pinned; notified when a model leaves memory or an
        # expiry changes. An RLock: closing an evicted model happens inside it.
        self._cond = threading.Condition()
        self._models = OrderedDict()
        self._live = 0  # models holding or loading weights
        self._loading = deque()  # loads waiting for a place in memory, oldest first
        self._reaper = None

    def acquire(self, path, load, keep_alive=KEEP_DEFAULT, wait=GENERATION_WAIT_SECS):
        """The loaded model for `path` with its lock held (`load()` makes the Llama if it is not
        in memory); the caller must `release` it. Waits at most `wait` seconds."""
        deadline = self.clock() + wait
        while True:
            with self._cond:
                entry = self._models.get(path)
                if entry is None:
                    entry = self._models[path] = LoadedModel(self, path)
                self._models.move_to_end(path)
            if not entry.lock.acquire(timeout=max(0.0, deadline - self.clock())):
                raise ModelBusy("The model is busy with other requests; try again shortly")
            if entry.evicted:
                entry.lock.release()  # it left memory while we queued: load it again
                continue
            if keep_alive is not KEEP_DEFAULT:
                with self._cond:
                    entry.keep_alive = keep_alive
            if entry.llm is None:
                self._load(entry, load, deadline)
            with self._cond:
                entry.expires = None
            return entry

    def _load(self, entry, load, deadline):
        try:
            self._reserve(entry, deadline)
        except BaseException:
            self._forget(entry)
            entry.lock.release()
            raise
        try:
            entry.llm = load()
            entry.formatter = chat_formatter(entry.llm)
        except BaseException:
            if entry.llm is not None:
                entry.llm.close()
                entry.llm = None
            with self._cond:
                self._live -= 1
                self._cond.notify_all()
            self._forget(entry)
            entry.lock.release()
            raise
        entry.loaded_at = time.time()
        entry.size = os.path.getsize(entry.path) if os.path.exists(entry.path) else 0

    def _forget(self, entry):
        with self._cond:
            if self._models.get(entry.path) is entry:
                del self._models[entry.path]

    def _reserve(self, entry, deadline):
        """Take a place in memory for `entry`, in arrival order among loads: evict the least
        recently used model if the pool is full, and wait (until `deadline`) for an evicted
        one to finish its generation."""
        ticket = object()
        with self._cond:
            self._loading.append(ticket)
            try:
                while True:
                    if self._loading[0] is ticket:
                        if self._live < self.capacity:
                            break
                        victims = [e for e in self._models.values()
                                   if e is not entry and e.llm is not None and not e.evicted]
                        victims.sort(key=lambda e: e.pinned)  # stable: LRU order within each group
                        if victims:
                            self._evict(victims[0], "to make room (LLM_MAX_LOADED_MODELS=%d)"
                                        % self.capacity)
                            continue
                    left = deadline - self.clock()
                    if left <= 0:
                        raise ModelBusy("Every loaded model is busy and LLM_MAX_LOADED_MODELS=%d "
                                        "are in memory; try again shortly" % self.capacity)
                    self._cond.wait(left)
                self._live += 1
            finally:
                self._loading.remove(ticket)
                self._cond.notify_all()

    def _evict(self, entry, why):
        """Mark a model as leaving memory (its condition held); it is closed now if no
        generation holds it, else by the generation's release."""
        entry.evicted = True
        self._forget(entry)
        if entry.llm is not None and entry.lock.acquire(timeout=0):
            log.info("unloading model %s %s", os.path.basename(entry.path), why)
            self._close(entry)
            entry.lock.release()

    def _close(self, entry):
        with self._cond:
            entry.llm.close()
            entry.llm = None
            self._live -= 1
            self._cond.notify_all()

    def release(self, entry):
        with self._cond:
            if entry.llm is not None:
                if entry.evicted:
                    self._close(entry)
                elif entry.lock.waiting() == 0:
                    keep = None if entry.pinned else entry.keep_alive
                    if keep == 0:
                        entry.evicted = True
                        self._forget(entry)
                        self._close(entry)
                    elif keep is not None:
                        entry.expires = self.clock() + keep
                        self._start_reaper()
                        self._cond.notify_all()
        entry.lock.release()

    def _start_reaper(self):
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="keep-alive", daemon=True)
            self._reaper.start()

    def _reap(self):
        """Unload models idle past their keep-alive, waking at the next expiry."""
        with self._cond:
            while True:
                now = self.clock()
                for entry in list(self._models.values()):
                    if (entry.expires is not None and entry.expires <= now
                            and entry.lock.acquire(timeout=0)):
                        if entry.llm is not None and not entry.evicted:
                            log.info("unloading model %s after %gs idle (keep_alive)",
                                     os.path.basename(entry.path), entry.keep_alive)
                            entry.evicted = True
                            self._forget(entry)
                            self._close(entry)
                        entry.lock.release()
                expiries = [e.expires for e in self._models.values() if e.expires is not None]
                self._cond.wait(min([60.0] + [max(0.01, t - now) for t in expiries]))

    def drop(self, path):
        """Unload a model (its file changed, or a client asked); it leaves memory once no
        generation holds it."""
        with self._cond:
            entry = self._models.get(path)
            if entry is not None:
                self._evict(entry, "(dropped)")

    def pin(self, path):
        with self._cond:
            entry = self._models.get(path)
            if entry is not None:
                entry.pinned = True
                entry.expires = None

    def loaded(self):
        with self._cond:
            return [e.path for e in self._models.values() if e.llm is not None and not e.evicted]

    def running(self):
        """(path, size, loaded_at, expires_at wall time or None) of each model in memory."""
        now, wall = self.clock(), time.time()
        with self._cond:
            return [(e.path, e.size, e.loaded_at,
                     None if e.pinned or e.keep_alive is None
                     else wall + ((e.expires - now) if e.expires is not None else e.keep_alive))
                    for e in self._models.values() if e.llm is not None and not e.evicted]

    def live(self):
        with self._cond:
            return self._live


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
        self.loader = loader or (lambda path: load_llama(path, settings))
        self.pool = ModelPool(settings.max_loaded_models, keep_alive=settings.keep_alive)
        # Set once every LLM_PRELOAD model is verified and loaded (/ready); `preload_errors`
        # says why not, while it is not.
        self.ready = threading.Event()
        self.preload_errors = {}
        if not settings.preload:
            self.ready.set()

    def load(self, name, keep_alive=KEEP_DEFAULT):
        """The loaded model for a name, its lock held: guard, repair if needed, load. The
        caller must `release()` it."""
        ref = names.parse(name)
        manifest = self.repairs.manifest(ref)
        layer = model_layer(manifest)
        path = self.store.blob_path(layer["digest"])
        if self.settings.verify_on_load:
            # In memory, a model is used while its file is unchanged. A changed file is checked
            # (and repaired) first, every request for it waiting on that one check; then any
            # load, which reads the file again, is verified alongside.
            if not self.guard.unchanged(layer):
                self.repairs.ensure(ref, on_change=self.pool.drop)
            return self.pool.acquire(path, lambda: self._load_verified(ref, layer, path), keep_alive)
        self.repairs.ensure(ref, on_change=self.pool.drop)
        return self.pool.acquire(path, lambda: self._load_checked(ref, path), keep_alive)

    def _load_verified(self, ref, layer, path):
        """Load the weights while the blob is verified (and repaired, if corrupted) on another
        thread: the request waits for the longer of the two, not their sum. Weights loaded
        from a blob that failed its check are dropped and the repaired blob is loaded (and
        verified) again."""
        for _attempt in range(3):
            check = _Call(lambda: self.repairs.check_layer(ref, layer, gguf=True))
            started = time.monotonic()
            llm, load_error = None, None
            try:
                llm = self.loader(path)
            except (ValueError, OSError, RuntimeError) as e:
                load_error = e
            loaded = time.monotonic() - started
            try:
                repaired = check.result(self.settings.repair_timeout_secs + 60)
            except BaseException:
                if llm is not None:
                    llm.close()
                raise
            self.metrics.inc("llmnode_verified_loads_total")
            log.info("model %s: loaded in %.2fs, blob verified in %.2fs%s", ref, loaded,
                     check.elapsed, " (repaired)" if repaired else "")
            if repaired:
                if llm is not None:
                    llm.close()
                continue
            if load_error is not None:
                raise ModelLoadFailed("Failed to load model file %s: %s; the blob matches its "
                                      "digest, so the model itself cannot be loaded by this "
                                      "llama.cpp" % (os.path.basename(path), load_error)) from load_error
            return llm
        raise ModelLoadFailed("model %s was repaired and found corrupted again while loading" % ref)

    def _load_checked(self, ref, path):
        """Load without a full verification (LLM_VERIFY_ON_LOAD=false): only a llama.cpp load
        failure leads to a full check."""
        try:
            return self.loader(path)
        except (ValueError, OSError, RuntimeError) as e:
            log.warning("model %s failed to load; checking its blob in full", ref)
            if not self.repairs.ensure(ref, full=True).repaired:
                raise ModelLoadFailed("Failed to load model file %s: %s; the blob matches its "
                                      "digest, so the model itself cannot be loaded by this "
                                      "llama.cpp" % (os.path.basename(path), e)) from e
            return self.loader(path)

    def preload(self, models):
        """Verify and load each LLM_PRELOAD model, keep it loaded, then set `ready`."""
        for name in models:
            self.preload_errors[name] = "loading"
        for name in models:
            try:
                entry = self.load(name)
                self.pool.pin(entry.path)
                entry.release()
                del self.preload_errors[name]
                log.info("preloaded model %s", name)
            except LLMNodeError as e:
                self.preload_errors[name] = str(e)
                log.error("preload of model %s failed: %s", name, e)
        if not self.preload_errors:
            self.ready.set()

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
            entry.release()
            if "exceed context window" in str(e):
                raise ContextTooLong("%s (LLM_CTX_SIZE=%d)" % (e, self.settings.n_ctx)) from e
            raise
        except BaseException:
            entry.release()
            raise
        if not req["stream"]:
            entry.release()
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
            entry.release()


class _Call:
    """A function run on its own thread; `result()` waits for it (with a deadline)."""

    def __init__(self, fn):
        self._fn = fn
        self._done = threading.Event()
        self._result = self._error = None
        self.elapsed = 0.0
        threading.Thread(target=self._run, daemon=True, name="verify-on-load").start()

    def _run(self):
        started = time.monotonic()
        try:
            self._result = self._fn()
        except BaseException as e:  # noqa: B036 - handed to the waiting thread
            self._error = e
        self.elapsed = time.monotonic() - started
        self._done.set()

    def result(self, timeout):
        if not self._done.wait(timeout):
            raise RepairTimeout()
        if self._error is not None:
            raise self._error
        return self._result


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

    @app.get("/ready")
    def ready():
        if node.ready.is_set():
            return {"status": "ready", "loaded": [os.path.basename(p) for p in node.pool.loaded()]}
        bottle.response.status = 503
        return {"status": "not ready", "preload": dict(node.preload_errors)}

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


def create_server(node, host, port, threads):
    """A waitress server for the node's app; waitress refuses a body over LLM_MAX_BODY_BYTES
    before reading it, and answers its own errors (413, 400, ...) in the OpenAI shape."""
    import waitress
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JSONErrorTask(ErrorTask):
        def execute(self):
            e = self.request.error
            if e.code == 413:
                err = PayloadTooLarge("Request body is larger than %d bytes (LLM_MAX_BODY_BYTES)"
                                      % node.settings.max_body_bytes)
            else:
                err = InvalidRequest("%s: %s" % (e.reason, e.body))
                err.status = e.code
            node.metrics.inc("llmnode_requests_total", status=str(err.status))
            body = json.dumps(err.body()).encode()
            self.status = "%d %s" % (e.code, e.reason)
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class Channel(HTTPChannel):
        error_task_class = JSONErrorTask

    server = waitress.create_server(make_app(node), host=host, port=port, threads=threads,
                                    ident="llmnode", clear_untrusted_proxy_headers=True,
                                    max_request_body_size=node.settings.max_body_bytes + 1)
    server.channel_class = Channel
    return server


def cmd_serve(settings):
    node = Node(settings)
    node.store.ensure_dirs()
    for path in node.store.remove_temporaries():
        log.info("removed %s, left by an interrupted write", path)
    server = create_server(node, settings.host, settings.port, settings.threads)
    if settings.preload:
        threading.Thread(target=node.preload, args=(settings.preload,), name="preload",
                         daemon=True).start()
    if settings.scrub_interval_secs:
        Scrubber(node.store, node.repairs, settings.scrub_interval_secs,
                 metrics=node.metrics).start()
    log.info("llmnode serving on http://%s:%s (store %s)", server.effective_host,
             server.effective_port, settings.models_dir)
    try:
        server.run()
    except KeyboardInterrupt:
        log.info("llmnode stopping")
    finally:
        server.close()
    return 0


def start_demo_node(settings):
    """Serve a node on a free loopback port in this process: (node, base url, stop)."""
    node = Node(settings)
    node.store.ensure_dirs()
    server = create_server(node, "127.0.0.1", 0, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    return node, "http://127.0.0.1:%s" % server.effective_port, server.close


def cmd_pull(settings, name):
    node = Node(settings)
    node.repairs.progress = progress_for
    ref = names.parse(name)
    log.info("pulling %s", ref)
    _manifest, fetched, moved = node.repairs.pull(ref)
    if moved:
        print("%s: the tag moved (was sha256:%s); now at the new version" % (ref, moved))
    print("pulled %s (%d blob(s) downloaded)" % (ref, len(fetched)))
    return 0


def cmd_verify(settings, name):
    """Full check of every blob; print each problem; exit 1 if any."""
    node = Node(settings)
    refs = [names.parse(name)] if name else node.store.models()
    bad = 0
    for ref in refs:
        for layer, problem in node.repairs.verify_model(ref):
            what = layer["digest"] if layer else "manifest"
            print("%s  %s  %s" % (ref, what, "ok" if problem is None else
                                  ("CORRUPTED: " if layer else "BAD: ") + problem))
            bad += problem is not None
    print("%d model(s) checked, %d problem(s)" % (len(refs), bad))
    return 1 if bad else 0


def cmd_repair(settings, name):
    """Fetch the manifest again if it is missing or unusable, then every bad blob: the same
    coordinator as the server (range repair, the cross-process lock, the log lines)."""
    node = Node(settings)
    node.repairs.progress = progress_for
    node.repairs.auto_repair = True
    ref = names.parse(name)
    fetched = node.repairs.check_model(ref)
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
            return run_demo(settings, start_demo_node)
        return cmd_list(settings)
    except LLMNodeError as e:
        log.error("%s failed: %s", command, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
