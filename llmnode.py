"""llmnode: an LLM node over an Ollama-layout store, on llama.cpp, speaking four APIs.

The HTTP surface, the model runtime and the command line live here; the store, the
registry client, downloads and repair live in the `repair` package. The sections, top to
bottom, each depending only on those above it:

- Logging.
- Runtime: the llama.cpp adapter (every private llama-cpp-python field in one place), the
  engine and its scheduler, the model pool. One compute thread runs llama.cpp's server loop
  for every loaded model: each step decodes the next token of every running answer, then up to
  512 prompt tokens in arrival order, so a long prompt never stalls the streams beside it and
  one model's load or repair never stalls another's. A loaded model is one context of
  LLM_PARALLEL sequences, each its own KV stream; a new request takes the sequence sharing the
  longest prefix of its prompt, or starts from a copy of a longer one's cells.
- The request type and the tool/grammar layer: `ChatRequest` (with `Message`, `ToolCall`,
  `Tool`), `CompletionRequest`, the checks every dialect shares, the field rule (known fields
  honoured or accepted, unknown ones named), grammars from any JSON schema, tool formats.
- Node: `ModelLoader` (model resolution: guard, repair, verified loading, preload, the Modelfile
  layers), then `Node` (the wiring, and every dialect's request made into Generations, the
  Modelfile's `system` and `params` layers applied for every dialect).
- HTTP: the app, the API key, `Dialect` (error body, stream framing), routes registered with
  their dialect, one error mapping, one stream function.
- One section per dialect, each a validator into the request type and a renderer of the one
  answer: OpenAI (chat, completions, embeddings, models), Responses, Anthropic, Ollama.
- Operations (health, readiness, metrics), then the command line.
"""

import argparse
import base64
import codecs
import contextvars
import ctypes
import dataclasses
import enum
import hashlib
import hmac
import itertools
import json
import logging
import os
import queue
import re
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field, replace

import bottle
import numpy as np

import conf
from repair import hashing, names, operations
from repair.coordinator import RepairCoordinator
from repair.errors import (  # noqa: F401 (ModelBusy, ContextTooLong: the runtime's, from here)
    ClientGone,
    ContextTooLong,
    EngineFault,
    InvalidRequest,
    LLMNodeError,
    MethodNotAllowed,
    ModelBusy,
    ModelLoadFailed,
    ModelNotFound,
    PayloadTooLarge,
    RepairTimeout,
    RouteNotFound,
    Unauthorized,
    UnsupportedParameter,
)
from repair.guard import IntegrityGuard
from repair.kvcache import PromptCache, Saver, common_prefix
from repair.metrics import Metrics
from repair.progress import LoggingProgress, progress_for
from repair.registry import RegistryClient
from repair.scrub import Scrubber
from repair.store import Store, model_layer, stat_stamp

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
# Runtime: the llama.cpp adapter ##############################################
###############################################################################
# Loading a GGUF, its chat template and metadata, embeddings, and the batched context answers are
# decoded in. Every private llama-cpp-python field the node touches is here, read from
# llama-cpp-python 0.3.36: `Llama._model.model` (the llama_model pointer the batched and
# embedding contexts are made on); and one public function it wraps,
# `llama_cpp.llama_model_default_params` (`without_extra_buffers`).

def cpu_has_amx():
    """Whether this CPU has Intel AMX (Sapphire Rapids and later), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


_NO_EXTRA_BUFFERS = []  # set once: llama.cpp's weight repacking is off in this process


def without_extra_buffers():
    """Turn off llama.cpp's extra weight buffers (repacking, AMX) for every model this process
    loads. Built for a CPU with AMX (pip's build targets the CPU it runs on), llama.cpp 0.3.36's
    AMX matrix multiply crashes the process (SIGSEGV in ggml_backend_amx_mul_mat) on SmolLM2's
    Q4_1 weights for any batch of more than a few tokens; llama-server's `--no-repack` is the same
    switch. llama-cpp-python has no parameter for it: its `llama_model_default_params` is wrapped."""
    import llama_cpp.llama_cpp as C

    if _NO_EXTRA_BUFFERS:
        return
    defaults = C.llama_model_default_params

    def model_defaults():
        params = defaults()
        params.use_extra_bufts = False
        return params

    C.llama_model_default_params = model_defaults
    _NO_EXTRA_BUFFERS.append(True)
    log.info("this CPU has AMX: llama.cpp's AMX and repacked weights are off (its AMX kernels "
             "crash on some quantizations)")


def load_llama(path, settings, gpu_layers=None):
    """Load a GGUF with llama.cpp; its chat template comes from the file. The layers offloaded to
    a GPU (`gpu_layers`: a request's options.num_gpu, -1 for all; else LLM_GPU_LAYERS) are logged,
    and kept as `llm.gpu_layers` beside the most it could take, `llm.gpu_max`."""
    import llama_cpp
    from llama_cpp import Llama

    if cpu_has_amx():
        without_extra_buffers()

    gpu = llama_cpp.llama_supports_gpu_offload()
    layers = settings.gpu_layers if gpu_layers is None else gpu_layers
    if layers is None:  # auto: every layer (llama-cpp-python's -1) when there is a GPU
        layers = -1 if gpu else 0
    # Nothing is decoded in the Llama's own context: answers are decoded in the model's
    # BatchedContext, embeddings in its EmbeddingContext, both made beside it.
    llm = Llama(model_path=path, n_ctx=BATCH_TOKENS, n_batch=BATCH_TOKENS, n_threads=settings.n_threads,
                use_mmap=settings.use_mmap, n_gpu_layers=layers, verbose=False)
    # llama.cpp offloads the repeating layers and then the output layer: n_layer + 1 in all.
    total = llama_cpp.llama_model_n_layer(model_pointer(llm)) + 1
    offloaded = (total if layers < 0 else min(layers, total)) if gpu else 0
    log.info("model %s: %d of %d layers offloaded to the GPU%s%s", os.path.basename(path), offloaded,
             total, "" if gpu_layers is None else " (options.num_gpu=%d)" % gpu_layers,
             "" if gpu else " (this llama.cpp has no GPU backend)")
    llm.gpu_layers, llm.gpu_max = offloaded, (total if gpu else 0)
    return llm


def offloaded_layers(llm, asked):
    """The layers a load asking for `asked` (options.num_gpu; -1: all) would put on the GPU, for
    the weights `llm` holds: what a request's num_gpu is compared by (0 on a CPU build)."""
    return llm.gpu_max if asked < 0 else min(asked, llm.gpu_max)


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


class EmbeddingContext:
    """A llama.cpp context in embeddings mode on a loaded model's weights, made on the model's
    first embedding or rerank (a chat model that never embeds holds none): one sequence of up to
    `n_ctx` tokens, the model's trained context capped by LLM_EMBED_CTX_SIZE. A model that pools
    (an embedding model, a reranker) reads an input in one batch, as llama.cpp's pooling needs;
    a chat model (no pooling) reads it in batches of BATCH_TOKENS, the KV cache carrying the
    earlier ones, and its token vectors are averaged."""

    def __init__(self, llm, cap, threads):
        import llama_cpp as C

        self.C = C
        model = model_pointer(llm)
        self.n_ctx = embed_limit(llm, cap)
        self.n_embd = C.llama_model_n_embd(model)
        params = C.llama_context_default_params()
        params.embeddings = True
        params.n_ctx = self.n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.pooling = llm.pooling_type()  # the GGUF's (the Llama's context takes the default too)
        self.n_batch = BATCH_TOKENS if self.pooling == C.LLAMA_POOLING_TYPE_NONE else self.n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        self.ctx = C.llama_init_from_model(model, params)
        if not self.ctx:
            raise ModelLoadFailed("llama.cpp could not make an embedding context of %d tokens "
                                  "(LLM_EMBED_CTX_SIZE)" % self.n_ctx)
        self.mem = C.llama_get_memory(self.ctx)
        self.batch = C.llama_batch_init(self.n_batch, 0, 1)
        # Held by the input being read, across its batches (each a compute-thread job): one
        # input at a time in the context's one sequence.
        self.lock = threading.Lock()
        # A reranker's pooled output is its classifier's n_cls_out scores, not a vector.
        self.n_out = C.llama_model_n_cls_out(model) if self.pooling == C.LLAMA_POOLING_TYPE_RANK \
            else self.n_embd

    def pooled(self, tokens, run):
        """The model's output for one token sequence (at most `n_ctx`): its pooled vector (or
        rank scores), or the mean of its token vectors when the model names no pooling. Each
        batch is one `run` (the compute thread's: answers' decode steps go on between a long
        input's batches)."""
        if not self.lock.acquire(timeout=GENERATION_WAIT_SECS):
            raise ModelBusy("The model's embedding context stayed busy for %ds" % GENERATION_WAIT_SECS)
        try:
            total = 0.0
            for start in range(0, len(tokens), self.n_batch):
                total = total + run(self._decode, tokens[start:start + self.n_batch], start)
            return run(self._output, total, len(tokens))
        finally:
            try:
                run(self.C.llama_memory_clear, self.mem, True)
            finally:
                self.lock.release()

    def _decode(self, part, start):
        """Read the tokens at positions start...; the sum of their vectors when the model names
        no pooling (else 0: the pooled output is read once, at the end)."""
        import numpy as np

        C, b = self.C, self.batch
        for i, token in enumerate(part):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, start + i, 1, True
            b.seq_id[i][0] = 0
        b.n_tokens = len(part)
        rc = C.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError("llama_decode returned %d" % rc)
        if self.pooling != C.LLAMA_POOLING_TYPE_NONE:
            return 0.0
        rows = np.ctypeslib.as_array(C.llama_get_embeddings(self.ctx), shape=(len(part), self.n_embd))
        return rows.sum(axis=0, dtype=np.float64)

    def _output(self, total, n):
        import numpy as np

        if self.pooling == self.C.LLAMA_POOLING_TYPE_NONE:
            return total / n
        return np.array(self.C.llama_get_embeddings_seq(self.ctx, 0)[:self.n_out], dtype=np.float64)

    def close(self):
        if self.ctx:
            self.C.llama_batch_free(self.batch)
            self.C.llama_free(self.ctx)
            self.ctx = None


def embed_limit(llm, cap):
    """Most tokens one embedding or rerank input of this model reads: its trained context, at
    most `cap` (LLM_EMBED_CTX_SIZE)."""
    import llama_cpp as C

    return min(C.llama_model_n_ctx_train(model_pointer(llm)) or cap, cap)


def embedder(llm, cap, threads):
    """The loaded model's EmbeddingContext, made on first use (on the compute thread, as every
    context of the model is)."""
    if getattr(llm, "embedder", None) is None:
        llm.embedder = EmbeddingContext(llm, cap, threads)
    return llm.embedder


def embed_tokens(llm, tokens, cap, threads, run):
    """One normalised embedding of a token sequence, its llama.cpp work done through `run` (the
    compute thread's): the pooling the GGUF names, or the mean over the tokens for a chat model
    (which names none)."""
    vector = run(embedder, llm, cap, threads).pooled(tokens, run)
    norm = float((vector * vector).sum()) ** 0.5
    return [float(x) for x in (vector / norm if norm else vector)]


def rank_score(llm, tokens, cap, threads, run):
    """A reranker's score of one (query, document) prompt: its classifier's first output, as
    llama.cpp's server reads it."""
    return float(run(embedder, llm, cap, threads).pooled(tokens, run)[0])


def rerank_tokens(llm, query, document):
    """The prompt a reranker reads for a query and a document, as llama.cpp's server builds it:
    the GGUF's `rerank` template when it has one, else BOS query EOS SEP document EOS, each
    special token where the vocabulary asks for it."""
    import llama_cpp as C

    model = model_pointer(llm)
    vocab = C.llama_model_get_vocab(model)
    template = C.llama_model_chat_template(model, b"rerank")
    if template:
        text = template.decode("utf-8").replace("{query}", query).replace("{document}", document)
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    eos = C.llama_vocab_eos(vocab)
    if eos < 0:
        eos = C.llama_vocab_sep(vocab)
    add_eos, add_sep = C.llama_vocab_get_add_eos(vocab), C.llama_vocab_get_add_sep(vocab)
    tokens = [C.llama_vocab_bos(vocab)] if C.llama_vocab_get_add_bos(vocab) else []
    tokens += llm.tokenize(query.encode("utf-8"), add_bos=False, special=False)
    tokens += [eos] if add_eos else []
    tokens += [C.llama_vocab_sep(vocab)] if add_sep else []
    tokens += llm.tokenize(document.encode("utf-8"), add_bos=False, special=False)
    return tokens + ([eos] if add_eos else [])


def token_piece(llm, token):
    """The bytes a token stands for, special tokens as their text (llama.cpp's server's pieces)."""
    import llama_cpp as C

    vocab = C.llama_model_get_vocab(model_pointer(llm))
    buf = ctypes.create_string_buffer(64)
    n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                 11: "<q", 12: "<d"}


def read_gguf_metadata(path, max_array=5):
    """(key -> value of a GGUF's metadata, parameter count). Arrays longer than `max_array`
    (vocabularies) come back empty, as Ollama's /api/show gives them."""
    with open(path, "rb") as f:
        def take(fmt):
            size = struct.calcsize(fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, raw)[0]

        def string():
            n = take("<Q")
            if n > 1 << 24:
                raise ValueError("GGUF string too long")
            return f.read(n).decode("utf-8", "replace")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                item, n = take("<I"), take("<Q")
                items = [value(item) for _ in range(n)]
                return items if n <= max_array else []
            if kind not in _GGUF_SCALARS:
                raise ValueError("unknown GGUF value type %d" % kind)
            return take(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        take("<I")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        params = 0
        for _ in range(n_tensors):
            string()
            dims = [take("<Q") for _ in range(take("<I"))]
            take("<I")
            take("<Q")
            count = 1
            for d in dims:
                count *= d
            params += count
    return meta, params


class MetadataCache:
    """The GGUF metadata of weights read after their check, by digest: read again only when
    the file's stat stamp has changed."""

    def __init__(self):
        # Guards _read: weights digest -> (stat stamp, metadata, parameter count).
        self._lock = threading.Lock()
        self._read = {}

    def read(self, digest, path):
        """`read_gguf_metadata` of the weights at `path`; ({}, 0) if they cannot be read (removed
        or replaced since their check: nothing is kept)."""
        stamp = stat_stamp(path)
        with self._lock:
            cached = self._read.get(digest)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        try:
            meta, params = read_gguf_metadata(path)
        except (OSError, ValueError):
            return {}, 0
        if stamp is not None:
            with self._lock:
                self._read[digest] = (stamp, meta, params)
        return meta, params


# Tokens one decode step carries at most (llama.cpp's default n_batch): the running answers'
# next tokens first, then prompt chunks, so a long prompt never stalls the streams beside it.
BATCH_TOKENS = 512


def model_pointer(llm):
    return llm._model.model


# LLM_KV_CACHE_TYPE and LLM_FLASH_ATTENTION, as llama.cpp's context takes them.
KV_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_*
FLASH_ATTENTION = {"auto": -1, "off": 0, "on": 1}  # LLAMA_FLASH_ATTN_TYPE_*


class BatchedContext:
    """One llama.cpp context on a loaded model's weights with `n_seq` sequences of `n_ctx`
    tokens each, each in its own KV stream (a sequence's cells can be copied to another), its
    keys and values of `kv_type`, flash attention `flash_attn` (auto, on, off)."""

    def __init__(self, llm, n_seq, n_ctx, threads, kv_type="f16", flash_attn="auto"):
        import llama_cpp as C

        self.C = C
        self.kv_type, self.flash_attn = kv_type, flash_attn
        params = C.llama_context_default_params()
        params.type_k = params.type_v = KV_CACHE_TYPES[kv_type]
        params.flash_attn_type = FLASH_ATTENTION[flash_attn]
        params.n_ctx = n_seq * n_ctx
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        # A KV stream per sequence: with one unified cache, attention over the other sequences'
        # (masked) cells changed SmolLM2's logits by up to 0.8 with the batch's make-up, so a
        # temperature-0 answer depended on who else was being served. Separate streams give the
        # same logits whatever the batch holds (llama-server's default too).
        params.kv_unified = False
        params.no_perf = True
        self.n_ctx = n_ctx
        self.model = model_pointer(llm)
        self.ctx = C.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise ModelLoadFailed("llama.cpp could not make a context of %d x %d tokens "
                                  "(LLM_PARALLEL x LLM_CTX_SIZE) with a %s KV cache and flash "
                                  "attention %s (LLM_KV_CACHE_TYPE, LLM_FLASH_ATTENTION: a "
                                  "quantised cache needs flash attention)"
                                  % (n_seq, n_ctx, kv_type, flash_attn))
        self.mem = C.llama_get_memory(self.ctx)
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.batch = C.llama_batch_init(BATCH_TOKENS, 0, n_seq)
        self._buf = ctypes.create_string_buffer(256)

    def decode(self, items):
        """One llama_decode of [(token, position, [sequence ids], wants logits)]."""
        b = self.batch
        for i, (token, pos, seqs, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, len(seqs), logits
            for k, seq in enumerate(seqs):
                b.seq_id[i][k] = seq
        b.n_tokens = len(items)
        rc = self.C.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError("llama_decode returned %d" % rc)

    def logits(self, i):
        return np.ctypeslib.as_array(self.C.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def state_key(self):
        """What a saved sequence state is valid for beside the weights: this llama.cpp build
        and the context's KV settings (a state saved under others is never restored)."""
        import llama_cpp

        return {"llama_cpp": llama_cpp.__version__,
                "system": self.C.llama_print_system_info().decode("utf-8", "replace"),
                "n_ctx": self.n_ctx, "kv_type": self.kv_type, "flash_attn": self.flash_attn,
                "kv_unified": False}

    def seq_state(self, seq):
        """The bytes of a sequence's KV state, as llama.cpp saves it."""
        size = self.C.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = self.C.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return ctypes.string_at(buf, written)

    def set_seq_state(self, seq, data):
        """Put saved state bytes in a sequence (its cells dropped first); whether llama.cpp
        took them."""
        self.C.llama_memory_seq_rm(self.mem, seq, -1, -1)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self.C.llama_state_seq_set_data(self.ctx, buf, len(data), seq) > 0:
            return True
        self.C.llama_memory_seq_rm(self.mem, seq, -1, -1)
        return False

    def forget(self, seq, start=0):
        """Drop a sequence's KV cells from position `start` on."""
        self.C.llama_memory_seq_rm(self.mem, seq, start, -1)

    def copy(self, src, dst):
        self.C.llama_memory_seq_rm(self.mem, dst, -1, -1)
        self.C.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def clear(self):
        self.C.llama_memory_clear(self.mem, True)

    def piece(self, token, special=False):
        n = self.C.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, special)
        if n < 0:
            self._buf = ctypes.create_string_buffer(-n)
            n = self.C.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, special)
        return self._buf.raw[:n]

    def is_eog(self, token):
        return self.C.llama_vocab_is_eog(self.vocab, token)

    def close(self):
        if self.ctx:
            self.C.llama_batch_free(self.batch)
            self.C.llama_free(self.ctx)
            self.ctx = None


@dataclass
class Sampler:
    """One answer's llama.cpp samplers: its chain, its grammar (None without one), and whether
    the chain is greedy alone (then the grammar is checked on the likeliest tokens first)."""

    chain: object
    grammar: object = None
    greedy: bool = False


class Samplers:
    """The answers' samplers on one BatchedContext: built from a `Sampling`, run on the
    context's logits (a grammar checked as llama.cpp's common sampler checks it), freed."""

    # Greedy under a grammar: the likeliest tokens the grammar allows are usually among the
    # likeliest few, so these are checked before the whole vocabulary.
    GREEDY_FIRST = 128

    def __init__(self, context):
        C = self.C = context.C
        self.context = context
        self.vocab, self.n_vocab = context.vocab, context.n_vocab
        # Candidates for a grammar answer's sampling (see `sample`), filled from the logits.
        self._candidates = (C.llama_token_data * self.n_vocab)()
        self._ids_logits = np.ctypeslib.as_array(self._candidates)
        self._all_ids = np.arange(self.n_vocab, dtype=np.int32)
        self._few = (C.llama_token_data * max(1, self.GREEDY_FIRST))()

    def build(self, s, history=()):
        """A Sampler for one answer: the chain is logit bias, penalties (fed the prompt's last
        tokens), then greedy at temperature 0 or top-k, top-p, min-p, temperature and a seeded
        draw, as llama.cpp's common sampler orders them; the grammar is applied as `sample`
        says."""
        C = self.C
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())

        def add(smpl):
            C.llama_sampler_chain_add(chain, smpl)
            return smpl

        if s.logit_bias:
            bias = (C.llama_logit_bias * len(s.logit_bias))(
                *[C.llama_logit_bias(t, b) for t, b in s.logit_bias.items()])
            add(C.llama_sampler_init_logit_bias(self.n_vocab, len(s.logit_bias), bias))
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            penalties = add(C.llama_sampler_init_penalties(self.n_vocab, 64, s.repeat_penalty,
                                                           s.frequency_penalty, s.presence_penalty))
            for token in list(history)[-64:]:
                C.llama_sampler_accept(penalties, token)
        gram = None
        if s.grammar:
            gram = C.llama_sampler_init_grammar(self.vocab, s.grammar.encode("utf-8"), b"root")
            if not gram:
                C.llama_sampler_free(chain)
                raise InvalidRequest("The grammar could not be parsed by llama.cpp")
        greedy = s.temperature <= 0 and C.llama_sampler_chain_n(chain) == 0
        if s.temperature <= 0:
            add(C.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                add(C.llama_sampler_init_top_k(s.top_k))
            add(C.llama_sampler_init_top_p(s.top_p, 1))
            add(C.llama_sampler_init_min_p(s.min_p, 1))
            add(C.llama_sampler_init_temp(s.temperature))
            add(C.llama_sampler_init_dist(s.seed))
        return Sampler(chain, gram, greedy)

    def free(self, sampler):
        for part in (sampler.chain, sampler.grammar):
            if part is not None:
                self.C.llama_sampler_free(part)

    def sample(self, sampler, i):
        """The token `sampler` picks from the logits at batch index `i`, accepted by its chain
        (and grammar). With a grammar, as llama.cpp's common sampler does: the chain picks from
        all the logits, and only a token the grammar refuses makes it pick again from the
        grammar's tokens, so the grammar is checked on one token, not the whole vocabulary."""
        chain, gram, greedy = sampler.chain, sampler.grammar, sampler.greedy
        if gram is None:
            return self.C.llama_sampler_sample(chain, self.context.ctx, i)  # applies and accepts
        if greedy:
            token = self._greedy_in_grammar(sampler, i)
        else:
            token = self._apply(chain, i)
            if not self.allows(sampler, [token]):
                token = self.pick(sampler, i)
        self.accept(sampler, token)
        return token

    def accept(self, sampler, token):
        """Advance a sampler (chain and grammar) past `token`."""
        for part in (sampler.chain, sampler.grammar):
            if part is not None:
                self.C.llama_sampler_accept(part, token)

    def pick(self, sampler, i):
        """The token `sampler` selects from the logits at batch index `i` with its grammar (if
        any) applied to the whole vocabulary first, accepted by neither: what `sample` picks,
        the long way."""
        return self._apply(sampler.chain, i, sampler.grammar)

    def allows(self, sampler, tokens):
        """Those of `tokens` (in their order) that `sampler`'s grammar allows next."""
        n = len(tokens)
        for k, token in enumerate(tokens):
            self._few[k].id, self._few[k].logit, self._few[k].p = int(token), 0.0, 0.0
        arr = self.C.llama_token_data_array(self._few, n, -1, False)
        self.C.llama_sampler_apply(sampler.grammar, ctypes.byref(arr))
        return [self._few[k].id for k in range(n) if self._few[k].logit != float("-inf")]

    def _greedy_in_grammar(self, sampler, i):
        """The likeliest token the grammar allows at batch index `i`: what greedy after the
        grammar would pick, exactly. The likeliest token is checked alone first (the grammar's
        cost is per token checked), then the likeliest few, then the whole vocabulary."""
        logits = self.context.logits(i)
        best = int(logits.argmax())  # the lowest id among equals, as llama.cpp's greedy picks
        if self.allows(sampler, [best]):
            return best
        top = logits.argpartition(-self.GREEDY_FIRST)[-self.GREEDY_FIRST:]
        top = top[(-logits[top]).argsort(kind="stable")]
        allowed = self.allows(sampler, top)
        if allowed:
            return allowed[0]
        return self.pick(sampler, i)

    def _apply(self, chain, i, first=None):
        """The token `chain` selects from the logits at batch index `i` (after `first`, if
        given), accepted by neither."""
        self._ids_logits["id"] = self._all_ids
        self._ids_logits["logit"] = self.context.logits(i)
        self._ids_logits["p"] = 0.0
        arr = self.C.llama_token_data_array(self._candidates, self.n_vocab, -1, False)
        if first is not None:
            self.C.llama_sampler_apply(first, ctypes.byref(arr))
        self.C.llama_sampler_apply(chain, ctypes.byref(arr))
        return arr.data[arr.selected].id


def close_model(llm):
    """Free a loaded model: its batched and embedding contexts, then the Llama."""
    for part in (getattr(llm, "slots", None), getattr(llm, "embedder", None)):
        if part is not None:
            part.close()
    llm.close()


###############################################################################
# Runtime: the engine and its scheduler #######################################
###############################################################################
# One compute thread for the process; per loaded model, `LLM_PARALLEL` sequences decoded together
# (continuous batching, as llama-server's update_slots) and kept as a prompt cache.

# The part of a prompt a free sequence's cache must hold for the request to take it over the
# least recently used one (llama-server's --slot-prompt-similarity default).
PREFIX_SHARE = 0.5


def by_sequence(items, sampled):
    """A step's batch items in order of sequence id (each sequence's own in position order), and
    the sampled answers' batch indices moved with them. Over separate KV streams llama.cpp cuts a
    batch into ubatches of consecutive, increasing sequence ids (`split_equal`, sequential): in
    arrival order, one decode of 8 answers' tokens became several (67 ms a step against 44)."""
    order = sorted(range(len(items)), key=lambda k: items[k][2][0])  # stable
    if all(k == i for i, k in enumerate(order)):
        return items, sampled
    moved = {k: i for i, k in enumerate(order)}
    return [items[k] for k in order], [(task, moved[i]) for task, i in sampled]


class ComputeThread:
    """The one thread that runs llama.cpp's compute for the whole process: loads, embeddings,
    and a decode step of every loaded model with running answers, in turns. llama.cpp here is
    built with OpenMP: every OS thread that computes gets a team of worker threads that keeps
    spinning when idle, so compute from waitress's many threads ran a third slower than from
    one (measured on SmolLM2, 2 cores)."""

    # How long a caller waits for its job or for its answer's next piece.
    WAIT_SECS = 3600

    def __init__(self, name="llama-compute"):
        self.name = name
        # Guards _jobs, _active (the Slots with work) and _thread; notified when either grows.
        self._cond = threading.Condition()
        self._jobs = deque()
        self._active = []
        self._thread = None

    def _start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self):
        while True:
            with self._cond:
                while not self._jobs and not self._active:
                    self._cond.wait()
                jobs, self._jobs = self._jobs, deque()
                active = list(self._active)
            for job in jobs:
                try:
                    job()
                except Exception:
                    # A posted job (a model's close) that fails is that job's loss alone: this
                    # thread is every model's, and ending it would stall them all.
                    log.exception("a job on the compute thread failed")
            for slots in active:
                if not self._step(slots):
                    with self._cond:
                        if not slots.has_work() and slots in self._active:
                            self._active.remove(slots)

    def _step(self, slots):
        """One step of one model; an exception that escapes it fails that model's answers in
        the step (with the traceback logged) and the engine goes on."""
        try:
            return slots.step()
        except Exception as e:
            log.exception("an engine step failed; ending its answers")
            try:
                slots.fault(e)
            except Exception:
                log.exception("ending the answers of a failed step failed; the model stops")
                return False
            return slots.has_work()

    def busy(self):
        """Whether answers or jobs wait on this thread: the store's hashing (repair.hashing)
        holds itself to one core while it is. Read without the lock: a glance, not a decision."""
        return bool(self._active or self._jobs)

    def post(self, fn):
        """Run fn() on the compute thread between decode steps, without waiting for it."""
        with self._cond:
            self._start()
            self._jobs.append(fn)
            self._cond.notify_all()

    def wake(self, slots):
        """`slots` has work: step it until it has none."""
        with self._cond:
            self._start()
            if slots not in self._active:
                self._active.append(slots)
            self._cond.notify_all()

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the compute thread; its result, or its exception raised."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        done, box = threading.Event(), {}

        def job():
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: B036 - handed to the caller
                box["error"] = e
            done.set()

        self.post(job)
        if not done.wait(self.WAIT_SECS):
            raise ModelBusy("The model did not finish within %ds" % self.WAIT_SECS)
        if "error" in box:
            raise box["error"]
        return box["result"]


class TaskState(enum.Enum):
    """Where an answer is, as llama.cpp's slot_state says it of a slot."""

    QUEUED = "queued"  # waiting for a sequence
    PROMPT = "prompt"  # holds a sequence; its prompt is read (or copied from its first sibling)
    GENERATING = "generating"  # a token sampled each step
    DONE = "done"  # ended (stopped, cut, cancelled or failed): its sequence is free


class Task:
    """One answer in the making: its prompt, sampler, sequence and the text it has made."""

    def __init__(self, run, index, gen, sampler):
        self.run, self.index, self.gen, self.sampler = run, index, gen, sampler
        self.state = TaskState.QUEUED
        self.seq = None  # the sequence it decodes in, once admitted
        self.todo = []  # prompt tokens still to prefill
        self.n_past = 0  # tokens of this answer's sequence in the KV cache
        self.last = None  # the sampled token not yet decoded
        self.generated = 0
        self.out = Output(index, gen, run.events)  # the text it has made, handed out as it comes
        self.siblings = []  # answers sharing this one's prefill (n > 1)
        self.arrival = 0  # its request's place in the order of arrival (set on submit)
        self.bypassed = 0  # later requests admitted while it waited (first of a group)
        self.admitted_at = None
        self.first_token_at = None
        self.restore = None  # (tokens, state bytes) of a saved prefix read from disk, checked
        self.read_secs = 0.0  # how long reading and checking it took
        self.computed = 0  # prompt tokens it read (not kept, copied or restored)
        # A reasoning model's answer: the tokens to feed instead of sampling (the block closed by
        # the budget), whether the answer grammar has started.
        self.forced, self.answer_sampler = [], False


class Output:
    """One answer's text as it is made: its tokens' bytes decoded as UTF-8, split into thinking
    and answer by a reasoning model's parser, the answer held back while it may be the start of
    a stop string; what is ready goes to `events` as `Piece`s (the thinking always, the answer
    unless the answer is held whole for tool parsing)."""

    def __init__(self, index, gen, events):
        self.index, self.stops, self.hold, self.events = index, gen.stop, gen.hold, events
        self.pending = ""  # answer text held back: it may be the start of a stop string
        self.text = []
        self.tokens, self.logprobs = [], []  # of the piece not yet handed out
        self.decoder = codecs.getincrementaldecoder("utf-8")("ignore")  # as llama-cpp-python
        self.parser = gen.reasoning.parser() if gen.reasoning is not None else None
        self.reasoning, self.reasoning_tokens = [], 0
        self.stopped = None  # the stop string met, which ends the answer

    def add(self, token, data, logprobs=None):
        """A generated token and its bytes (markers' text kept for a reasoning model's parser):
        the stop string it completed, or None."""
        if logprobs is not None:
            self.logprobs.append(logprobs)
        self.tokens.append(token)
        text = self.decoder.decode(data)
        if self.parser is None:
            self._answer(text)
            return self.stopped
        thinking = self.parser.thinking
        segments = self.parser.feed(text)
        if thinking or self.parser.thinking:
            self.reasoning_tokens += 1
        self._segments(segments)
        return self.stopped

    def _segments(self, segments):
        for kind, text in segments:
            if self.stopped is not None:
                return
            if kind == "answer":
                self._answer(text)
            else:
                self.reasoning.append(text)
                self.events.put(Piece(self.index, text, [], [], kind="reasoning"))

    def _answer(self, text):
        """Add answer text, handing out what cannot be the start of a stop string."""
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                self.pending, self.stopped = self.pending[:at], stop
                return
        hold = max([k for stop in self.stops for k in range(1, len(stop))
                    if self.pending.endswith(stop[:k])] or [0])
        ready = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        self._hand_out(ready)

    def _hand_out(self, text):
        if text:
            self.text.append(text)
        if (text or self.tokens) and not self.hold:
            self.events.put(Piece(self.index, text, self.tokens, self.logprobs))
            self.tokens, self.logprobs = [], []

    def finish(self, reason, generated):
        """The answer has ended for `reason`: what was held is handed out (unless it was
        cancelled), and its `Finish`."""
        if self.stopped is None:
            tail = self.decoder.decode(b"", final=True)
            if self.parser is None:
                self.pending += tail
            else:
                for kind, text in self.parser.feed(tail) + self.parser.finish():
                    if kind == "answer":
                        self.pending += text
                    elif reason != "cancelled":
                        self.reasoning.append(text)
                        self.events.put(Piece(self.index, text, [], [], kind="reasoning"))
        if reason != "cancelled":
            self._hand_out(self.pending)
        self.pending = ""
        return Finish(self.index, reason, "".join(self.text), generated, self.stopped,
                      "".join(self.reasoning), self.reasoning_tokens,
                      self.parser.calls if self.parser is not None else None)


# The callable saying whether the client of the request this thread serves has gone (waitress's
# `waitress.client_disconnected`, set by the HTTP layer for each request); None when unknown.
CLIENT_GONE = contextvars.ContextVar("client_gone", default=None)


class EngineRun:
    """The engine's side of a started request, as its caller holds it (a dialect holds the
    `Answer` made of it): its events (Piece, Finish) as they come, the usage and
    timings once it has ended; close() stops it (a client that went away). `gone()`, if given,
    says whether the client has gone; it is asked every GONE_POLL_SECS while no event comes, so
    an answer nobody reads (unstreamed, held for tool calls, or queued) stops within that."""

    GONE_POLL_SECS = 0.5

    def __init__(self, engine, slots, gens, release, gone=None):
        self.engine, self.slots, self._release, self._gone = engine, slots, release, gone
        self.events = queue.Queue()
        self.usage = Usage(prompt_tokens=sum(len(g.prompt) for g in gens))
        self.timings = {}
        self.started = time.monotonic()
        self.groups, index = [], 0
        for gen in gens:
            group = []
            for k in range(gen.n):
                sampling = gen.sampling
                if k:
                    sampling = replace(sampling, seed=(sampling.seed + k) % (2 ** 32))
                group.append(Task(self, index, gen, slots.samplers.build(sampling, gen.prompt)))
                index += 1
            self.groups.append(group)
        self._open = index  # answers not yet finished (read and written by the caller only)
        self._ask_at = 0.0  # when `gone` is next asked (by the caller only)
        self.cancelled = False  # read by the compute thread at each step

    def __iter__(self):
        while self._open:
            event = self._next()
            if isinstance(event, BaseException):
                self.close()
                raise event
            if isinstance(event, Finish):
                self._open -= 1
                self.usage.completion_tokens += event.tokens
                self.usage.reasoning_tokens += event.reasoning_tokens
            yield event
        self.close()

    def _next(self):
        """The next event; ModelBusy past WAIT_SECS without one, ClientGone once the client left
        (asked every GONE_POLL_SECS, whether events come or not: an unstreamed answer's pieces
        come all the time, and nobody reads them)."""
        deadline = time.monotonic() + self.engine.WAIT_SECS
        while True:
            now = time.monotonic()
            if self._gone is not None and now >= self._ask_at:
                self._ask_at = now + self.GONE_POLL_SECS
                if self._gone():
                    self.close()
                    raise ClientGone("The client closed its connection; its answer was stopped")
            if now >= deadline:
                self.close()
                raise ModelBusy("The model did not answer within %ds" % self.engine.WAIT_SECS)
            wait = deadline - now
            if self._gone is not None:
                wait = min(wait, max(0.0, self._ask_at - now))
            try:
                return self.events.get(timeout=wait)
            except queue.Empty:
                pass

    def close(self):
        """Stop any answer still running (its sequence is free at the next step), release the
        model once."""
        if self._release is None:
            return
        if self._open:
            self.cancelled = True
            self.engine.wake(self.slots)
        release, self._release = self._release, None
        release()


# A waiting request needing more free sequences than there are (`n` answers) lets later requests
# that fit go first, but only this many times: then it holds the queue until enough are free.
BYPASS_LIMIT = 8

# A request starts from a copy of another sequence's cells (busy or idle) when they hold at
# least this many more of its prompt's tokens than the sequence it gets; a shorter gain is
# cheaper computed than copied (a copy moves the whole KV stream).
COPY_MIN_TOKENS = 64


class Slots:
    """A loaded model's sequences and the answers waiting for one. Every method but `submit`
    runs on the compute thread. `step_hook(task)`, if given, runs before each answer is sampled
    (a test seam: an exception there is a fault in that step). With `kv` (a prompt-cache
    Saver), a prompt of `cache_min` tokens or more is saved once read, and a prompt whose
    longest prefix is on disk rather than in a sequence starts from the saved state."""

    def __init__(self, llm, engine, n_seq, n_ctx, threads, metrics=None, step_hook=None, kv=None,
                 cache_min=1024, kv_type="f16", flash_attn="auto"):
        self.llm, self.engine, self.n_ctx = llm, engine, n_ctx
        self.metrics = metrics or Metrics()
        self.step_hook = step_hook
        self.ctx = BatchedContext(llm, n_seq, n_ctx, threads, kv_type, flash_attn)
        self.samplers = Samplers(self.ctx)
        self.kv, self.cache_min = kv, cache_min
        # What a saved state of this model is bound to: the weights (a blob is named by its
        # digest), the build and the KV settings.
        self.key = dict(self.ctx.state_key(), weights=os.path.basename(getattr(llm, "model_path", "")))
        self.cache = [[] for _ in range(n_seq)]  # tokens whose KV cells each sequence holds
        self.busy = [None] * n_seq  # the task decoding in each sequence
        self.used = [0] * n_seq  # when each sequence was last given out
        self.keys = [None] * n_seq  # the cache key (`prompt_cache_key`) of each one's last answer
        self._clock = itertools.count(1)
        # Guards _waiting (lists of tasks sharing a prompt, oldest first) and _arrivals: filled
        # by request threads, emptied by the compute thread.
        self._lock = threading.Lock()
        self._waiting = deque()
        self._arrivals = itertools.count(1)
        self.closed = False

    # -- the request threads' side --

    def submit(self, run):
        for group in run.groups:
            self._look_up(group[0])
        with self._lock:
            for group in run.groups:
                arrival = next(self._arrivals)
                for task in group:
                    task.arrival = arrival
            self._waiting.extend(run.groups)
        self.engine.wake(self)

    def _look_up(self, task):
        """Read (and check) the saved state of the longest prefix of a prompt from disk, when
        no sequence holds one as long: on the request's thread, so the engine never waits on a
        disk."""
        prompt = task.gen.prompt
        if self.kv is None or len(prompt) < self.cache_min:
            return
        # The compute thread replaces and grows these lists; a copy of each is a consistent
        # (if already dated) view, which is all a guess at the best source needs.
        in_memory = max(common_prefix(list(cached), prompt) for cached in self.cache)
        started = time.monotonic()
        try:
            found = self.kv.cache.find(self.key, prompt, max(self.cache_min, in_memory + COPY_MIN_TOKENS))
        except OSError as e:  # derived data: a cache that cannot be read is a miss, not a failure
            log.warning("prompt cache: could not be read (%s); the prompt is read instead", e)
            return
        if found is not None:
            task.restore, task.read_secs = found, time.monotonic() - started

    # -- the compute thread's side --

    def has_work(self):
        with self._lock:
            waiting = bool(self._waiting)
        return not self.closed and (waiting or any(self.busy))

    def close(self):
        self.closed = True
        for task in [t for t in self.busy if t is not None]:
            self._end(task, "stop")
        self.ctx.close()

    def _running(self):
        """The answers holding a sequence, in arrival order."""
        return sorted((t for t in self.busy if t is not None), key=lambda t: (t.arrival, t.index))

    def _admit(self):
        """Give waiting answers free sequences in arrival order; a group that does not fit yet
        lets later ones go first at most BYPASS_LIMIT times."""
        with self._lock:
            waiting = list(self._waiting)
        blocked = []  # earlier groups waiting for more free sequences than there are
        for group in waiting:
            if group[0].run.cancelled:
                self._unqueue(group)
                for task in group:
                    task.state = TaskState.DONE
                    self.samplers.free(task.sampler)
                continue
            free = [s for s, t in enumerate(self.busy) if t is None]
            if len(free) < len(group):
                blocked.append(group)
                if group[0].bypassed >= BYPASS_LIMIT:
                    return
                continue
            for g in blocked:
                g[0].bypassed += 1
            self._unqueue(group)
            try:
                self._place(group, free)
            except Exception as e:
                # Out of the queue and maybe in no sequence yet: ended here, or never.
                log.exception("admitting an answer failed; ending it")
                self._fail(group, e)

    def _unqueue(self, group):
        with self._lock:
            self._waiting.remove(group)

    def _place(self, group, free):
        """Start a group in free sequences: the first where the longest prefix of its prompt is
        (kept, or copied from any sequence, busy or idle), the others from a copy of its prompt
        once read."""
        first = group[0]
        seq, source, keep = self._choose(first, free)
        first.run.usage.cached_tokens += self._take(first, seq, keep, source)
        free.remove(seq)
        for task in group[1:]:  # decoded from a copy of the first one's prompt
            sib = min(free, key=lambda s: self.used[s])
            free.remove(sib)
            self._take(task, sib, 0, prefill=False)
            first.siblings.append(task)

    def _choose(self, task, free):
        """(free sequence, where its cells come from, prompt tokens kept) for a task's prompt:
        the free sequence sharing the longest prefix with it (if it shares enough, else the least
        recently used); its cells its own, or copied from the sequence (busy or idle) whose
        cells hold the longest prefix, or restored from the state read from disk, when either
        is COPY_MIN_TOKENS longer."""
        prompt, restore, task.restore = task.gen.prompt, task.restore, None
        shared = [common_prefix(cached, prompt) for cached in self.cache]
        seq = max(free, key=lambda s: (shared[s], -self.used[s]))
        if shared[seq] < len(prompt) * PREFIX_SHARE:
            # A few shared opening tokens are not worth another conversation's cache.
            seq = min(free, key=lambda s: self.used[s])
        mine = [s for s in free if task.gen.cache_key is not None and self.keys[s] == task.gen.cache_key]
        if mine and shared[mine[0]] >= shared[seq]:
            # The client's cache key names the conversation: its sequence stays its own, not
            # another conversation's that happens to share as much.
            seq = mine[0]
        donor = max(range(len(self.cache)), key=lambda s: shared[s])
        limit = len(prompt) - 1  # the last prompt token is decoded again: its logits sample
        if restore is not None:
            saved = common_prefix(restore[0], prompt)
            if saved >= max(shared[seq], shared[donor]) + COPY_MIN_TOKENS:
                return seq, restore, min(saved, limit)
        if shared[donor] >= shared[seq] + COPY_MIN_TOKENS:
            return seq, donor, min(shared[donor], limit)
        return seq, None, min(shared[seq], limit)

    def _take(self, task, seq, keep, source=None, prefill=True):
        """Give `task` sequence `seq` holding the first `keep` tokens of its prompt: its own
        cells, a copy of sequence `source`'s, or the saved state `source` (tokens, bytes).
        The tokens it keeps (fewer if llama.cpp refuses the saved state)."""
        self.busy[seq], task.seq = task, seq
        self.used[seq] = next(self._clock)
        self.keys[seq] = task.gen.cache_key
        task.state = TaskState.PROMPT
        task.admitted_at = time.monotonic()
        if isinstance(source, tuple):
            started = time.monotonic()
            if self.ctx.set_seq_state(seq, source[1]):
                self.cache[seq] = list(source[0][:keep])
                log.info("prompt cache: restored %d tokens of a saved prompt (%.1f MiB, read and "
                         "checked in %.3f s, set in %.3f s)", keep, len(source[1]) / (1 << 20),
                         task.read_secs, time.monotonic() - started)
            else:
                log.warning("llama.cpp refused a saved prompt state of %d tokens; reading the "
                            "prompt", len(source[0]))
                self.cache[seq], keep = [], 0
        elif source is not None:
            self.ctx.copy(source, seq)
            self.cache[seq] = self.cache[source][:keep]
        else:
            del self.cache[seq][keep:]
        self.ctx.forget(seq, keep)
        task.n_past = keep
        task.todo = list(task.gen.prompt[keep:]) if prefill else []
        task.computed = len(task.todo)
        return keep

    def step(self):
        """One decode step: a token of every generating answer, then prompt chunks in arrival
        order; each answer sampled at its batch index. False when there is nothing left to do."""
        if self.closed:
            return False
        self._admit()
        items, sampled = [], []  # sampled: (task, batch index)
        running = self._running()
        for task in running:
            if task.run.cancelled:
                self._end(task, "cancelled")
            elif task.state is TaskState.GENERATING:
                sampled.append((task, len(items)))
                items.append((task.last, task.n_past, [task.seq], True))
                self.cache[task.seq].append(task.last)
                task.n_past += 1
        marked = []  # answers whose prompt read so far ends at a client's cache breakpoint
        for task in running:
            if task.state is not TaskState.PROMPT or not task.todo or len(items) >= BATCH_TOKENS:
                continue
            room = BATCH_TOKENS - len(items)
            # (a mark too short to be saved cuts nothing)
            mark = next((m for m in task.gen.save_at if m > task.n_past and m >= self.cache_min), None)
            if mark is not None:  # a chunk ends at a breakpoint: its prefix alone is then saved
                room = min(room, mark - task.n_past)
            chunk = task.todo[:room]
            del task.todo[:len(chunk)]
            for k, token in enumerate(chunk):
                items.append((token, task.n_past + k, [task.seq], not task.todo and k == len(chunk) - 1))
            self.cache[task.seq].extend(chunk)
            task.n_past += len(chunk)
            if not task.todo:
                sampled.append((task, len(items) - 1))
            elif task.n_past == mark:
                marked.append(task)
        if not items:
            return self.has_work()
        items, sampled = by_sequence(items, sampled)
        try:
            self.ctx.decode(items)
        except Exception as e:
            log.exception("decode step failed; ending its answers")
            self.fault(e)
            return False
        for task in marked:
            self._save(task, task.n_past)
        for task, i in sampled:
            read = task.state is TaskState.PROMPT  # its prompt's last chunk was in this step
            for sib in task.siblings:  # the prompt is read once, then copied to each sibling
                self.ctx.copy(task.seq, sib.seq)
                self.cache[sib.seq] = list(self.cache[task.seq])
                sib.n_past = task.n_past
                self._sample_or_fail(sib, i)
            task.siblings = []
            self._sample_or_fail(task, i)
            if read and len(self.cache[task.seq]) == len(task.gen.prompt):
                # Saved once its first token is out, so the state's copy (~120 MB for 5k tokens
                # of SmolLM2) never delays it; the cells are still the prompt's alone (a failed
                # sampling drops them: nothing is saved then).
                self._save(task, len(task.gen.prompt))
        return True

    def _save(self, task, length):
        """Hand the first `length` tokens of a prompt, just read, to the prompt cache on disk: if
        they are long, were read here (not kept, copied or restored) for the most part, and are
        the whole prompt of a request without cache breakpoints, or end at one of its breakpoints."""
        prompt, kept = task.gen.prompt, len(task.gen.prompt) - task.computed
        if self.kv is None or length < self.cache_min or length - kept < self.cache_min:
            return
        if task.gen.save_at and length not in task.gen.save_at:
            return
        self.kv.put(self.key, list(prompt[:length]), self.ctx.seq_state(task.seq))

    def fault(self, error):
        """A step failed outside one answer's sampling: every answer holding a sequence ends
        with the error, and every sequence's cells are dropped (a failed step may have left them
        half-written)."""
        self._fail([t for t in self.busy if t is not None], error)
        self.ctx.clear()
        self.cache = [[] for _ in self.cache]

    def _sample_or_fail(self, task, i):
        """Sample one answer; an exception there ends that answer alone."""
        try:
            if self.step_hook is not None:
                self.step_hook(task)
            self._sample(task, i)
        except Exception as e:
            log.exception("sampling answer %d failed; ending it", task.index)
            self._fail([task] + task.siblings, e)

    def _fail(self, tasks, error):
        """End `tasks` with an error their callers raise (a 500); what their sequences hold is
        dropped, not kept as a prompt cache."""
        if not isinstance(error, LLMNodeError):
            error = EngineFault("The engine failed on this request (%s: %s); the node's log has "
                                "the traceback" % (type(error).__name__, error))
        for task in tasks:
            if task.state is TaskState.DONE:
                continue
            task.state = TaskState.DONE
            if task.seq is not None and self.busy[task.seq] is task:
                self.busy[task.seq] = None
                self.ctx.forget(task.seq)
                self.cache[task.seq] = []
            self.samplers.free(task.sampler)
            task.run.events.put(error)

    def _sample(self, task, i):
        if task.forced:  # the budget's closing marker, fed as if sampled
            token = task.forced.pop(0)
            self.samplers.accept(Sampler(task.sampler.chain), token)  # the chain only: no grammar yet
        else:
            token = self.samplers.sample(task.sampler, i)
        if task.first_token_at is None:
            task.first_token_at = time.monotonic()
        if self.ctx.is_eog(token):
            self._end(task, "stop")
            return
        task.state = TaskState.GENERATING
        task.generated += 1
        task.last = token
        logprobs = self._logprobs(i, token, task.gen.logprobs) if task.gen.logprobs >= 0 else None
        out = task.out
        # A reasoning model's markers are special tokens: their text is kept for its parser.
        stop = out.add(token, self.ctx.piece(token, special=out.parser is not None), logprobs)
        if stop is not None:
            self._end(task, "stop")
            return
        if out.parser is not None:
            self._reasoned(task)
        if task.generated >= task.gen.max_tokens or task.n_past + 1 >= self.n_ctx:
            self._end(task, "length")

    def _logprobs(self, i, token, top):
        logits = self.ctx.logits(i).astype(np.float64)
        peak = logits.max()
        logz = peak + np.log(np.exp(logits - peak).sum())
        alternatives = []
        if top:
            best = np.argpartition(-logits, top)[:top]
            best = best[np.argsort(-logits[best])]
            alternatives = [(self._token_text(int(t)), float(logits[t] - logz)) for t in best]
        return self._token_text(token), float(logits[token] - logz), alternatives

    def _token_text(self, token):
        return self.ctx.piece(token).decode("utf-8", "replace")

    def _reasoned(self, task):
        """A reasoning model's answer after a token: the answer grammar starts once the
        thinking has ended; the budget spent, the block is closed."""
        parser, reasoning = task.out.parser, task.gen.reasoning
        if reasoning.answer_grammar and not task.answer_sampler and parser.answering:
            task.answer_sampler = True
            self.samplers.free(task.sampler)
            task.sampler = self.samplers.build(replace(task.gen.sampling, grammar=reasoning.answer_grammar),
                                               self.cache[task.seq])
        if (reasoning.budget is not None and parser.thinking and not task.forced
                and task.out.reasoning_tokens >= reasoning.budget):
            task.forced = list(reasoning.close_tokens)

    def _end(self, task, reason):
        """An answer is over: its sequence is free (keeping its tokens as a prompt cache)."""
        finish = task.out.finish(reason, task.generated)
        task.state = TaskState.DONE
        self.busy[task.seq] = None
        self.used[task.seq] = next(self._clock)
        self.samplers.free(task.sampler)
        self.metrics.inc("llmnode_generated_tokens_total", task.generated)
        run = task.run
        if task is run.groups[0][0] and task.first_token_at is not None:
            # The prompt's time runs from when it got a sequence: time queued is not reading.
            run.timings["queue"] = task.admitted_at - run.started
            run.timings["prompt_eval"] = task.first_token_at - task.admitted_at
            run.timings["eval"] = time.monotonic() - task.first_token_at
        run.events.put(finish)


###############################################################################
# Runtime: the model pool #####################################################
###############################################################################

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
    """One model's weights in memory, shared by every request running on it."""

    def __init__(self, pool, path):
        self.pool = pool
        self.path = path
        # Set (and cleared) only by the thread holding `lock` (the load) or the pool's condition
        # (the close); read without either: a reader that sees None takes `lock` and looks again.
        self.llm = None
        self.formatter = None
        # Held while the weights load: the first request loads them, the others wait in order.
        self.lock = FairLock()
        # The fields below are guarded by the pool's condition.
        self.users = 0  # requests holding the model (each running answers on it)
        self.evicted = False  # leaving memory: freed when its last user releases it
        self.expires = None  # monotonic time of its idle unload; None while in use or kept
        self.keep_alive = pool.keep_alive  # seconds idle before unload; None: forever
        self.pinned = False  # preloaded: never unloaded for being idle
        self.loaded_at = None  # wall-clock time of the load, for /api/ps
        self.size = 0

    def release(self):
        """A request is done with the model: it may now leave memory."""
        self.pool.release(self)


class ModelPool:
    """Models loaded on first use, at most `capacity` in memory at once (those being loaded and
    those evicted but still finishing their answers count too); the least recently used leaves
    first, and an idle model leaves after its keep-alive. `close(llm)` frees a model."""

    def __init__(self, capacity, keep_alive=300.0, clock=time.monotonic, close=None):
        self.capacity = capacity
        self.keep_alive = keep_alive
        self.clock = clock
        self.close_model = close or (lambda llm: llm.close())
        # Guards _models (path -> LoadedModel, oldest use first), _live, _loading, _reaper and
        # each entry's users/evicted/expires/keep_alive/pinned; notified when a model leaves
        # memory, a load ends or an expiry changes.
        self._cond = threading.Condition()
        self._models = OrderedDict()
        self._live = 0  # models holding or loading weights
        self._loading = deque()  # loads waiting for a place in memory, oldest first
        self._reaper = None

    def acquire(self, path, load, keep_alive=KEEP_DEFAULT, wait=GENERATION_WAIT_SECS, gpu_layers=None):
        """The loaded model for `path` (`load()` makes the Llama if it is not in memory), shared
        with every other request on it; the caller must `release` it. Waits at most `wait`.
        `gpu_layers` (Ollama's options.num_gpu) that would offload other layers than the loaded
        model has loads it again, as Ollama does: the loaded one leaves once its answers end (a
        preloaded one's place kept)."""
        deadline = self.clock() + wait
        pinned = False  # a preloaded model left to be loaded again: so is its successor
        reloaded = False  # asked once for this request: what comes next is taken as it is
        while True:
            with self._cond:
                entry = self._models.get(path)
                if entry is None:
                    entry = self._models[path] = LoadedModel(self, path)
                    entry.pinned = pinned
                self._models.move_to_end(path)
                entry.users += 1
                entry.expires = None
                if keep_alive is not KEEP_DEFAULT:
                    entry.keep_alive = keep_alive
            if entry.llm is None:
                if not entry.lock.acquire(timeout=max(0.0, deadline - self.clock())):
                    self._unuse(entry)
                    raise ModelBusy("The model is still loading for other requests; try again shortly")
                try:
                    if entry.llm is None and not entry.evicted:
                        self._load(entry, load, deadline)
                except BaseException:
                    self._unuse(entry)
                    raise
                finally:
                    entry.lock.release()
            if entry.evicted or entry.llm is None:
                self._unuse(entry)  # it left memory (or its load failed) while we queued
                continue
            if (gpu_layers is not None and not reloaded and hasattr(entry.llm, "gpu_max")
                    and offloaded_layers(entry.llm, gpu_layers) != entry.llm.gpu_layers):
                reloaded = True
                with self._cond:
                    pinned = pinned or entry.pinned
                    if not entry.evicted:
                        log.info("model %s: loading it again to offload %d layers to the GPU "
                                 "(options.num_gpu=%d); the loaded one leaves once its answers end",
                                 os.path.basename(path), offloaded_layers(entry.llm, gpu_layers),
                                 gpu_layers)
                        self._evict(entry, "(options.num_gpu)")
                self._unuse(entry)
                continue
            return entry

    def _unuse(self, entry):
        with self._cond:
            entry.users -= 1
            self._settle(entry)

    def _load(self, entry, load, deadline):
        try:
            self._reserve(entry, deadline)
        except BaseException:
            self._forget(entry)
            raise
        try:
            llm = load()
            formatter = chat_formatter(llm)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()
            self._forget(entry)
            raise
        entry.llm, entry.formatter = llm, formatter
        entry.loaded_at = time.time()
        entry.size = os.path.getsize(entry.path) if os.path.exists(entry.path) else 0

    def _forget(self, entry):
        with self._cond:
            if self._models.get(entry.path) is entry:
                del self._models[entry.path]

    def _reserve(self, entry, deadline):
        """Take a place in memory for `entry`, in arrival order among loads: evict the least
        recently used model if the pool is full, and wait (until `deadline`) for an evicted
        one's answers to end."""
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
        """Mark a model as leaving memory (its condition held); it is freed now if no request
        holds it, else when its last request releases it."""
        entry.evicted = True
        self._forget(entry)
        if entry.llm is not None and entry.users == 0:
            log.info("unloading model %s %s", os.path.basename(entry.path), why)
            self._close(entry)

    def _close(self, entry):
        llm, entry.llm = entry.llm, None
        self.close_model(llm)
        self._live -= 1
        self._cond.notify_all()

    def release(self, entry):
        with self._cond:
            entry.users -= 1
            self._settle(entry)

    def _settle(self, entry):
        """What an entry no request holds does next (the condition held): leave memory, or
        wait out its keep-alive."""
        if entry.users or entry.llm is None:
            return
        keep = None if entry.pinned else entry.keep_alive
        if entry.evicted:
            self._close(entry)
        elif keep == 0:
            entry.evicted = True
            self._forget(entry)
            self._close(entry)
        elif keep is not None:
            entry.expires = self.clock() + keep
            self._start_reaper()
            self._cond.notify_all()

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
                    if (entry.expires is not None and entry.expires <= now and entry.users == 0
                            and entry.llm is not None and not entry.evicted):
                        log.info("unloading model %s after %gs idle (keep_alive)",
                                 os.path.basename(entry.path), entry.keep_alive)
                        entry.evicted = True
                        self._forget(entry)
                        self._close(entry)
                expiries = [e.expires for e in self._models.values() if e.expires is not None]
                self._cond.wait(min([60.0] + [max(0.01, t - now) for t in expiries]))

    def drop(self, path):
        """Unload a model (its file changed, or a client asked); it leaves memory once no
        request holds it."""
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

    def entry(self, path):
        """The model for `path` while it is in memory (not leaving it), else None."""
        with self._cond:
            entry = self._models.get(path)
            return entry if entry is not None and entry.llm is not None and not entry.evicted else None

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
# The request type and the tool/grammar layer #################################
###############################################################################
# What every dialect's body is checked into (`ChatRequest` of `Message`s, `ToolCall`s and `Tool`s;
# `CompletionRequest`), what the Node makes of it for the engine (`Generation`) and what comes back
# (`Piece` and `Finish` from the engine; `Answer` and its `Choice`, as every dialect renders them;
# `Usage`); the checks every dialect shares and the field rule; grammars for structured output and
# tool calls from any JSON schema; the chat template's prompt and the parsing of tool calls, done
# once here for every dialect.

@dataclass
class ToolCall:
    """A call of a function tool: by the model in an answer, or sent back in a conversation."""

    id: str
    name: str
    arguments: dict


@dataclass
class Message:
    """One message of a conversation, whatever dialect it came in: a role (system, user,
    assistant, tool), its text, an assistant's tool calls, a tool result's call id and name."""

    role: str
    content: str = ""
    tool_calls: list = field(default_factory=list)  # [ToolCall]
    tool_call_id: str = None
    name: str = None  # a tool result's function name, when the dialect says it
    reasoning: str = ""  # an assistant's thinking, sent back (rendered as its template expects)
    # A client's cache breakpoint ends here (Anthropic's `cache_control`): the prompt's prefix
    # up to this message's end is worth keeping in the prompt cache.
    cache_mark: bool = False


@dataclass
class Tool:
    """A function the model may call: its name, what it does, its parameters' JSON schema."""

    name: str
    description: str
    parameters: dict
    kind: str = "function"  # or "custom": free-form, one string (`FREE_FORM_INPUT`), its input
    namespace: str = None  # a Responses `namespace` tool's: its calls are answered with it


@dataclass(kw_only=True)
class Options:
    """What a checked request of any dialect asks of its answers beside its prompt. A sampling
    field left None is the model's Modelfile `params` layer's, else llama.cpp's server default
    (`SAMPLING_DEFAULTS`)."""

    model: str
    max_tokens: int = None
    temperature: float = None
    top_p: float = None
    top_k: int = None
    min_p: float = None
    seed: int = None
    repeat_penalty: float = None
    presence_penalty: float = None
    frequency_penalty: float = None
    logit_bias: dict = None
    stop: list = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    keep_alive: object = KEEP_DEFAULT
    ctx_limit: int = None  # Ollama's options.num_ctx
    gpu_layers: int = None  # Ollama's options.num_gpu: layers offloaded (-1: all); None: as loaded
    format: str = None  # None, "json" or "schema"
    format_schema: dict = None
    cache_key: str = None  # prompt_cache_key: keep the conversation on the sequence with its prefix
    ignored: list = field(default_factory=list)  # fields no real API has: named in a header and the log


@dataclass(kw_only=True)
class ChatRequest(Options):
    """A checked chat request of any dialect, as the Node runs it."""

    messages: list  # [Message]
    tools: list = field(default_factory=list)  # [Tool]
    tool_choice: str = "none"  # none, auto, required, or a tool's name
    strict_format: bool = False  # a `strict` schema: refused if it cannot be constrained whole
    logprobs: bool = False
    top_logprobs: int = None
    thinking: bool = None  # a reasoning model's thinking asked on or off (None: the template's default)
    effort: str = None  # reasoning effort: low, medium or high (harmony's reasoning_effort)
    budget: int = None  # thinking tokens at most (with LLM_REASONING_BUDGET, the smaller)
    template_kwargs: dict = field(default_factory=dict)  # more variables for the chat template


@dataclass(kw_only=True)
class CompletionRequest(Options):
    """A checked raw-text completion (OpenAI's /v1/completions, Ollama's `raw` generate)."""

    prompts: list  # strings or token arrays
    echo: bool = False
    logprobs: int = None  # completions' logprobs: how many alternatives


@dataclass
class Sampling:
    """How one answer's tokens are picked."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int = 0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)
    grammar: str = None  # llama.cpp GBNF text, or None


@dataclass
class Generation:
    """One request for the engine, whatever dialect it came in: a prompt as tokens, how to
    sample it, when to stop, and what to report."""

    prompt: list
    sampling: Sampling
    max_tokens: int
    stop: list = field(default_factory=list)
    n: int = 1  # answers to the same prompt, sharing its prefill
    logprobs: int = -1  # -1: none; else the sampled token's logprob and this many alternatives
    hold: bool = False  # the answer is parsed whole (tool calls): no pieces until it ends
    # The client's name for the conversation (OpenAI's `prompt_cache_key`): among free sequences
    # sharing as long a prefix, the one its last answer used is taken.
    cache_key: str = None
    reasoning: "Reasoning" = None  # a reasoning model's thinking, split from the answer
    # Prompt lengths (tokens) at the client's cache breakpoints: each prefix is saved to the prompt
    # cache as it is read (and then not the whole prompt); empty: the whole prompt is the one saved.
    save_at: list = field(default_factory=list)


@dataclass
class Piece:
    """Text of answer `index` as it is generated, with its tokens and their logprobs."""

    index: int
    text: str
    tokens: list
    logprobs: list  # [(token text, logprob, [(alternative text, logprob)])] or []
    kind: str = "answer"  # or "reasoning": a reasoning model's thinking (sent even when held)


@dataclass
class Finish:
    """Answer `index` has ended: why (stop, length), its whole text, the stop string met; a
    reasoning model's thinking, its tokens, and the tool calls its format carried (harmony)."""

    index: int
    reason: str
    text: str
    tokens: int
    stop_sequence: str = None
    reasoning: str = ""
    reasoning_tokens: int = 0
    calls: list = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in a sequence's KV cache, not evaluated again
    reasoning_tokens: int = 0  # of the completion tokens, those of the thinking

    def openai(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}


@dataclass
class Choice:
    """Answer `index` has ended, as every dialect renders it (the engine's raw `Finish`, parsed):
    its message (content, and tool calls parsed once, in `chat_message`), why (stop, length,
    tool_calls), the stop string met, the whole text as generated."""

    index: int
    message: Message  # the assistant's, its tool calls parsed
    reason: str
    stop_sequence: str = None
    text: str = ""
    reasoning: str = ""  # a reasoning model's thinking (streamed as Pieces of kind "reasoning")


class Answer:
    """A started answer, as a Node hands it to a dialect: `Piece`s as text is made (none in a tool
    mode, which holds the text until it can be parsed), then a `Choice` per choice; `usage` and
    `timings` once it has been read to the end. close() stops it (a client that went away)."""

    def __init__(self, run, tools=None, mode=None, prompts=None):
        self._run, self._tools, self._mode = run, tools, mode
        self.choices = run._open  # how many answers (n per prompt)
        self.held = mode is not None  # no Pieces: the text is parsed for tool calls at the end
        self.usage, self.timings = run.usage, run.timings
        self.prompts = prompts  # completions: each prompt's text (for `echo`)

    def __iter__(self):
        try:
            for event in self._run:
                if isinstance(event, Piece):
                    yield event
                    continue
                message, reason = chat_message(event, self._tools, self._mode)
                yield Choice(event.index, message, reason, event.stop_sequence, event.text, event.reasoning)
        finally:
            self._run.close()

    def close(self):
        self._run.close()

    def collect(self):
        """The whole answer: ({index: Choice}, {index: logprob items})."""
        ended, logprobs = {}, {}
        for event in self:
            if isinstance(event, Piece):
                logprobs.setdefault(event.index, []).extend(event.logprobs)
            else:
                ended[event.index] = event
        return ended, logprobs


# The sampling fields a request, a Modelfile's params layer or the defaults set.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                   "frequency_penalty")


# llama.cpp's server defaults (Ollama's too, but for its repeat_penalty), where neither the request
# nor the model's params layer sets a field.
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


# -- the checks every dialect shares; errors name `where`, the field as the dialect spells it --

def unknown_fields(body, known, where, ignored):
    """Note in `ignored` each field of `body` that no real API has (not in `known`): it is left
    alone, and named in the answer's `llmnode-ignored-fields` header and the log."""
    for key in body:
        if key not in known:
            ignored.append("%s.%s" % (where, key) if where else key)
    return ignored


def refuse(req, key, ok, why):
    """Refuse a field whose value cannot be honoured where ignoring it would change the answer."""
    if req.get(key) is not None and not ok(req[key]):
        raise UnsupportedParameter("'%s' is not supported: %s" % (key, why))


def _number(req, key, low, high, where=None):
    """req[key] checked; errors name `where` (the field as the dialect spells it), else `key`."""
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest("'%s' must be a number from %s to %s" % (where or key, low, high))
    return value


def _integer(req, key, low, high, where=None):
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest("'%s' must be an integer from %d to %d" % (where or key, low, high))
    return value


def _bool(req, key, default=False, where=None):
    value = req.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest("'%s' must be true or false" % (where or key))
    return value


def _model(req):
    if not isinstance(req, dict):
        raise InvalidRequest("The request body must be a JSON object")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string")
    names.parse(model)
    return model


def _stop(req, where="stop", key="stop", most=4):
    stop = req.get(key)
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > most
                             or not all(isinstance(s, str) and s for s in stop)):
        raise InvalidRequest("'%s' must be a string or an array of up to %d strings" % (where, most))
    return stop


def _logit_bias(req):
    bias = req.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise InvalidRequest("'logit_bias' must be an object of up to 1024 token ids")
    clean = {}
    for token, value in bias.items():
        if not str(token).isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise InvalidRequest("'logit_bias' maps token ids to numbers from -100 to 100")
        clean[int(token)] = float(value)
    return clean


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def function_tool(where, name, description, parameters):
    """One `Tool`, its parts checked; errors name `where`. Any valid JSON schema is taken: what the
    grammar cannot express becomes "any JSON value" there (`grammar_schema`)."""
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise InvalidRequest("'%s.name' must be 1-128 letters, digits, _, ., : or -" % where)
    if description is not None and not isinstance(description, str):
        raise InvalidRequest("'%s.description' must be a string" % where)
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InvalidRequest("'%s' must have a JSON schema object as its parameters" % where)
    return Tool(name, description or "", parameters)


# A free-form (custom) tool is offered as a function taking one string, its input.
FREE_FORM_INPUT = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


def tool_choice(choice, tools, where="tool_choice"):
    """A checked choice: none, auto, required, or the name of one of `tools`."""
    if choice is None:
        return "auto" if tools else "none"
    if choice not in ("none", "auto", "required") and choice not in [t.name for t in tools]:
        raise InvalidRequest("'%s' must be none, auto, required or name a function in 'tools'" % where)
    if choice != "none" and not tools:
        raise InvalidRequest("'%s' needs 'tools'" % where)
    return choice


def function_tools(req, ignored):
    """([Tool], choice: "none", "auto", "required" or a name) of tools and tool_choice in OpenAI's
    shape, which Ollama's chat shares."""
    tools, choice = req.get("tools"), req.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise InvalidRequest("'tool_choice' needs 'tools'")
        return [], "none"
    if not isinstance(tools, list) or len(tools) > 512:
        raise InvalidRequest("'tools' must be an array of up to 512 tools")
    clean = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and tool.get("type") == "custom" and isinstance(tool.get("custom"), dict):
            custom = tool["custom"]
            clean.append(replace(function_tool("tools[%d].custom" % i, custom.get("name"),
                                               custom.get("description"), FREE_FORM_INPUT), kind="custom"))
            continue
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidRequest("'tools[%d]' must be {\"type\": \"function\", \"function\": {...}}" % i)
        unknown_fields(tool, ("type", "function"), "tools[%d]" % i, ignored)
        unknown_fields(fn, ("name", "description", "parameters", "strict"), "tools[%d].function" % i, ignored)
        clean.append(function_tool("tools[%d].function" % i, fn.get("name"), fn.get("description"),
                                   fn.get("parameters")))
    if isinstance(choice, dict):
        if choice.get("type") == "allowed_tools":
            choice = (choice.get("allowed_tools") or {}).get("mode", "auto")
        else:
            name = (choice.get("function") or choice.get("custom") or {}).get("name")
            if name not in [t.name for t in clean]:
                raise InvalidRequest("'tool_choice' names a function that is not in 'tools'")
            choice = name
    elif choice not in (None, "none", "auto", "required"):
        raise InvalidRequest("'tool_choice' must be none, auto, required or a named function")
    return clean, tool_choice(choice, clean) if clean else "none"


def format_schema(schema, where, strict=False):
    """("schema", a JSON schema) checked: a `strict` one that the grammar cannot hold whole is
    refused by name; any other valid schema is taken, loosened where it must be."""
    if not isinstance(schema, dict):
        raise InvalidRequest("'%s' must be a JSON schema object" % where)
    if strict:
        loose = loosened_keywords(schema)
        if loose:
            raise UnsupportedParameter("'%s': the JSON Schema keyword '%s' cannot be enforced by the "
                                       "grammar, and the schema is strict" % (where, loose[0]))
    return "schema", schema


# Any JSON value, as a schema the grammar converter takes (its `{}` would be an object only).
ANY_VALUE = {"type": ["object", "array", "string", "number", "boolean", "null"]}


# JSON Schema keywords the grammar cannot enforce: dropped, so the answer is held to the rest.
LOOSE_KEYWORDS = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
                  "patternProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                  "contains", "minContains", "maxContains", "uniqueItems", "multipleOf", "$dynamicRef",
                  "$dynamicAnchor", "$recursiveRef")


# A length bound is written out in the grammar a repetition per unit: above this, it is dropped
# (a tool's `maxLength: 524288` would make a 4 MB grammar).
LENGTH_LIMIT = 256
_LENGTH_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


_PRIMITIVE_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def _converter_takes(s):
    """Whether llama-cpp-python's schema converter recognises this (sub)schema's shape."""
    kind = s.get("type")
    if isinstance(kind, list):
        return all(t in _PRIMITIVE_TYPES for t in kind)
    if "$ref" in s:
        return isinstance(s["$ref"], str) and s["$ref"].startswith("#/")
    if any(k in s for k in ("oneOf", "anyOf", "const", "enum")):
        return True
    if kind in (None, "object") and any(k in s for k in ("properties", "additionalProperties", "allOf")):
        return True
    if kind in (None, "array") and any(k in s for k in ("items", "prefixItems")):
        return True
    if kind in (None, "string") and "pattern" in s:
        return True
    return kind in _PRIMITIVE_TYPES


def _loosen(schema, dropped):
    """A copy of `schema` the grammar converter takes: keywords it cannot enforce dropped (named in
    `dropped`), and any place it does not recognise (no `type`, a remote `$ref`, ...) any JSON value."""
    if isinstance(schema, bool):
        return ANY_VALUE if schema else {"const": None}
    if not isinstance(schema, dict):
        return ANY_VALUE
    s = {}
    for key, value in schema.items():
        if key in LOOSE_KEYWORDS or (key in _LENGTH_KEYWORDS and isinstance(value, int)
                                     and value > LENGTH_LIMIT):
            dropped.append(key)
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            s[key] = {k: _loosen(v, dropped) for k, v in value.items()}
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            s[key] = [_loosen(v, dropped) for v in value]
        elif key == "items" and isinstance(value, list):
            s[key] = [_loosen(v, dropped) for v in value]
        elif key in ("items", "additionalProperties") and isinstance(value, (dict, bool)):
            s[key] = value if value is False else _loosen(value, dropped) if value is not True else True
        else:
            s[key] = value
    if "additionalProperties" in s and s["additionalProperties"] is True:
        del s["additionalProperties"]
    if not _converter_takes(s):
        if s and not set(s) <= {"description", "title", "default", "examples", "$schema", "$id",
                                "$comment", "deprecated", "readOnly", "writeOnly"}:
            dropped.append(next((k for k in s if k not in ("description", "title")), "type"))
        return dict(ANY_VALUE, **{k: s[k] for k in ("$defs", "definitions") if k in s})
    return s


def loosened_keywords(schema):
    """The keywords of `schema` that its grammar cannot enforce (empty: it is held whole)."""
    dropped = []
    _loosen(schema, dropped)
    return dropped


def grammar_schema(schema):
    """The schema a grammar is made from: `schema` loosened where the converter cannot follow it."""
    return _loosen(schema, [])


def params_layer(extras):
    """A model's params layer (Ollama's JSON of default options) as checked options; a value of
    the wrong kind is left out, with a warning (the layer matches its digest: it was made so)."""
    try:
        params = json.loads(extras.get("params") or "{}")
    except ValueError:
        params = None
    if not isinstance(params, dict):
        log.warning("a params layer that is not a JSON object is not applied")
        return {}
    checks = {"temperature": (0, 2), "top_p": (0, 1), "min_p": (0, 1), "repeat_penalty": (0, 100),
              "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
    clean = {}
    for key in params:
        try:
            if key in checks:
                clean[key] = _number(params, key, *checks[key])
            elif key in ("top_k", "seed", "num_predict"):
                clean[key] = _integer(params, key, -(2 ** 63), 2 ** 64 - 1)
            elif key == "num_gpu":
                clean[key] = _integer(params, key, -1, 1 << 16)
            elif key == "stop":
                clean[key] = _stop(params, most=64)
        except InvalidRequest as e:
            log.warning("the params layer's %s is not applied: %s", key, e)
    return {k: v for k, v in clean.items() if v is not None}


def with_system(req, system):
    """The request with a Modelfile's system prompt as its first message, when it has none."""
    if system and not any(m.role == "system" for m in req.messages):
        return replace(req, messages=[Message("system", system)] + req.messages)
    return req


def cache_marks(messages, prompt, render):
    """The prompt's lengths at the messages a client marked (`Message.cache_mark`): the tokens
    the conversation up to each marked message renders to (by `render`, the prompt's own
    renderer) shares with the whole prompt. A part the template will not render alone (some
    want a user message last) marks nothing. A mark on the last message is the whole prompt
    (Claude Code's and automatic caching's usual place): no second render."""
    marks = set()
    for i, m in enumerate(messages):
        if not m.cache_mark:
            continue
        if i == len(messages) - 1:
            marks.add(len(prompt))
            continue
        try:
            part = render(messages[:i + 1])[0]
        except Exception as e:
            log.debug("a cache breakpoint at message %d marks nothing: %s", i, e)
            continue
        marks.add(common_prefix(part, prompt))
    return sorted(n for n in marks if 0 < n <= len(prompt))


def _thought(m):
    """An assistant message's thinking under the names the templates read (Qwen3:
    `reasoning_content`, harmony: `thinking`); each template keeps or drops it as its model expects."""
    return {"reasoning_content": m.reasoning, "thinking": m.reasoning} if m.reasoning else {}


def template_messages(messages, native):
    """`Message`s as a chat template takes them: for a template that renders tools itself
    (`native`), structured as Hugging Face's templates take them; else tool calls and results as
    the generic format's JSON, in plain text."""
    out = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            if native:
                out.append(dict({"role": "assistant", "content": m.content, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls]}, **_thought(m)))
            else:
                text = "\n".join(json.dumps({"tool_call": {"name": c.name, "arguments": c.arguments}})
                                 for c in m.tool_calls)
                out.append({"role": "assistant", "content": (m.content + "\n" + text).strip()})
        elif m.role == "tool":
            if native:
                out.append(dict({"role": "tool", "content": m.content, "tool_call_id": m.tool_call_id},
                                **({"name": m.name} if m.name else {})))
            else:
                out.append({"role": "tool", "content": json.dumps({"tool_response": {
                    "tool_call_id": m.tool_call_id, "content": m.content}})})
        else:
            out.append(dict({"role": m.role, "content": m.content}, **_thought(m)))
    return out


class Memo:
    """What `make()` gave for a key, kept for the `size` keys used last (any thread)."""

    def __init__(self, size):
        self.size = size
        # Guards _kept: key -> value, the most recently used last. A value is made outside it
        # (two threads may both make one; either is right).
        self._lock = threading.Lock()
        self._kept = OrderedDict()

    def get(self, key, make):
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        value = make()
        with self._lock:
            self._kept[key] = value
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return value


_GRAMMARS = Memo(64)  # schema text -> llama.cpp grammar text


def grammar(schema=None, wrap=None):
    """llama.cpp grammar text for JSON matching `schema` (any JSON value when None), converted
    once per schema; `wrap` = (before, after): literal text around the JSON."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    def make():
        try:
            # From the schema as given: its property order is the order of the answer's keys.
            text = JSON_GBNF if schema is None else json_schema_to_gbnf(json.dumps(grammar_schema(schema)))
            # JSON has no raw control characters in a string; the converter's `char` lets them in
            # (llama.cpp's own converter, and JSON_GBNF, keep them out).
            text = text.replace(r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |')
        except Exception as e:  # the converter raises bare Exceptions and more for odd schemas
            # A valid schema is never refused: held to any JSON value where it cannot be followed.
            log.warning("the JSON schema could not be turned into a grammar (%s); any JSON value is "
                        "allowed in its place", e)
            text = JSON_GBNF
        if wrap:
            text = re.sub(r"^root ::=", "wrapped-json ::=", text, flags=re.M)
            text = "root ::= %s wrapped-json %s\n%s" % (json.dumps(wrap[0]), json.dumps(wrap[1]), text)
        return text

    key = (json.dumps(wrap) if wrap else "") + (json.dumps(schema) if schema is not None else "")
    return _GRAMMARS.get(key, make)


def tool_call_schema(tools, choice, response=None):
    """The JSON a constrained answer must be (llama.cpp's generic tool format): a call of one
    of `tools`, or (with `auto`) a plain answer in `response` (a string, or JSON matching the
    `response` schema)."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
              "required": ["name", "arguments"]}
             for t in tools if choice in ("auto", "required") or t.name == choice]
    call = {"type": "object", "properties": {"tool_call": calls[0] if len(calls) == 1 else
                                              {"anyOf": calls}},
            "required": ["tool_call"]}
    if choice != "auto":
        return call
    answer = {"type": "string"} if response is None else response
    return {"anyOf": [call, {"type": "object", "properties": {"response": answer},
                             "required": ["response"]}]}


def tool_system_prompt(tools, schema):
    """What llama.cpp's generic format tells the model: the tools and the JSON to answer in."""
    return ("You can call these tools:\n%s\n\nRespond in JSON format, either with `tool_call` "
            "(a request to call a tool) or with `response` (a reply to the user), matching this "
            "schema:\n%s" % (json.dumps([{"name": t.name, "description": t.description,
                                          "parameters": t.parameters} for t in tools], indent=1),
                             json.dumps(schema)))


def with_tools(messages, tools, schema):
    """Messages with the tools described in the (first) system message."""
    text = tool_system_prompt(tools, schema)
    if messages and messages[0]["role"] == "system":
        return [dict(messages[0], content=messages[0]["content"] + "\n\n" + text)] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def parse_tool_answer(text):
    """(tool call {"name", "arguments"} or None, plain text) from a constrained answer."""
    try:
        doc = json.loads(text, strict=False)
    except ValueError:
        return None, _cut_response(text)
    if isinstance(doc, dict) and isinstance(doc.get("tool_call"), dict):
        return doc["tool_call"], None
    if isinstance(doc, dict) and "response" in doc:
        answer = doc["response"]
        return None, answer if isinstance(answer, str) else json.dumps(answer)
    return None, text


_RESPONSE_OPENING = re.compile(r'\s*\{\s*"response"\s*:\s*"')


def _cut_response(text):
    """The text of a plain answer cut off by its token budget, `{"response": "...` unfinished:
    the string so far (its escapes decoded); any other unfinished answer as it is."""
    m = _RESPONSE_OPENING.match(text)
    if m is None:
        return text
    rest = text[m.end():]
    for cut in range(len(rest), max(-1, len(rest) - 8), -1):  # an escape or `"}` cut short
        try:
            return json.loads('"%s"' % rest[:cut], strict=False)
        except ValueError:
            continue
    return text


def renders_tools(formatter):
    """Whether a chat template renders tools itself in the Hermes/Qwen way (`<tool_call>`
    blocks): such models get their tools, calls and results through their own template."""
    template = getattr(formatter, "template", "") or ""
    return "tools" in template and "<tool_call>" in template


def native_tool_grammar(tools, choice):
    """A grammar for one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block of
    one of `tools` (or the one named)."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
              "required": ["name", "arguments"]}
             for t in tools if choice == "required" or t.name == choice]
    return grammar(calls[0] if len(calls) == 1 else {"anyOf": calls},
                   wrap=("<tool_call>\n", "\n</tool_call>"))


def parse_native_calls(text, tools):
    """([{"name", "arguments"}] from the `<tool_call>` blocks of an answer, the rest of it)."""
    known = {t.name for t in tools}
    calls = []
    for block in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
        try:
            # Raw control characters inside strings are let through (byte-vocabulary models
            # produce them under a grammar); json.dumps escapes them on the way out.
            call = json.loads(block, strict=False)
        except ValueError:
            continue
        if (isinstance(call, dict) and call.get("name") in known
                and isinstance(call.get("arguments", {}), dict)):
            calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    if not calls:
        return [], text
    return calls, re.sub(r"<tool_call>.*?(</tool_call>|$)", "", text, flags=re.S).strip()


def render_chat(llm, formatter, messages, tools=None, template_kwargs=None, tokens_of=None):
    """(prompt tokens, the template's stop strings, the prompt's text) of a chat;
    `template_kwargs` are more variables for the template (`enable_thinking`, ...);
    `tokens_of(text, add_bos, read)`, if given, has the text read into tokens (`read()`)."""
    if formatter is None:
        text = "".join("%s: %s\n" % (m["role"], m["content"]) for m in messages) + "assistant:"
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), [], text
    extra = dict(template_kwargs or {}, **({"tools": tools} if tools else {}))
    try:
        rendered = formatter(messages=messages, **extra)
    except ValueError as e:  # the template's raise_exception: what it refuses, in its words
        raise InvalidRequest("The model's chat template refused the messages: %s" % e) from e
    add_bos = not rendered.added_special

    def read():
        return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=add_bos, special=True)

    tokens = read() if tokens_of is None else tokens_of(rendered.prompt, add_bos, read)
    stop = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop] if rendered.stop else []
    return tokens, stop, rendered.prompt


def chat_message(finish, tools, mode):
    """(the assistant `Message`, finish reason) of an ended answer: tool calls parsed once here,
    for every dialect to render."""
    text, reason = finish.text, finish.reason
    if mode is None:
        return Message("assistant", text), reason
    if mode == "harmony":
        calls, plain = finish.calls or [], text
    elif mode == "native":
        calls, plain = parse_native_calls(text, tools)
    else:
        call, plain = parse_tool_answer(text)
        calls = [call] if call is not None else []
    if not calls:
        return Message("assistant", plain), reason
    return Message("assistant", plain or "", [
        ToolCall("call_%s" % os.urandom(12).hex(), c["name"],
                 c["arguments"] if isinstance(c.get("arguments"), dict) else {})
        for c in calls]), "tool_calls"


def _token_bytes(text):
    return list(text.encode("utf-8"))


def chat_logprobs(items):
    return {"content": [{"token": t, "logprob": lp, "bytes": _token_bytes(t),
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": _token_bytes(a)}
                                          for a, alp in alts]} for t, lp, alts in items]}


def completion_logprobs(items):
    offsets, at = [], 0
    for t, _lp, _alts in items:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in items], "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [dict(alts) for _, _, alts in items], "text_offset": offsets}


###############################################################################
# Reasoning formats ###########################################################
###############################################################################
# A reasoning model writes its thinking before its answer, between markers its chat template
# knows: `<think>…</think>` (Qwen3, DeepSeek-R1 and its distills, SmolLM3; some templates open the
# block themselves, so the answer starts inside it) or harmony's channels (gpt-oss: `analysis`,
# `commentary` with `to=functions.NAME` tool calls, `final`). The format is recognised from the
# model's template (a few substring tests per chat), as llama.cpp's chat parsers do; the prompt as
# rendered says where the answer begins. A `ReasoningParser` per answer splits
# the generated text at the markers as it comes (a marker may span tokens), in the engine's one
# place where tokens become pieces, so no marker text reaches a client.

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HARMONY_MESSAGE, HARMONY_END = "<|message|>", "<|end|>"
# What the node writes to end a reasoning it has to cut (the budget), and to open one itself
# (a grammar-constrained answer must come after the thinking, so the thinking is begun in the prompt).
HARMONY_TO_FINAL = "<|end|><|start|>assistant<|channel|>final<|message|>"
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
EFFORTS = ("low", "medium", "high")


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model's template marks its thinking, and the template variables that control it."""

    kind: str  # "think" or "harmony"
    thinking_switch: bool = False  # the template reads `enable_thinking`
    effort_switch: bool = False  # the template reads `reasoning_effort`

    def template_kwargs(self, thinking=None, effort=None):
        """The template variables for a request's controls: `enable_thinking` (on unless turned
        off: templates such as R1's close the block when it is not set), `reasoning_effort`
        (harmony cannot turn thinking off: `think: false` asks for the least)."""
        kwargs = {}
        if self.thinking_switch:
            kwargs["enable_thinking"] = thinking is not False
        if self.effort_switch:
            kwargs["reasoning_effort"] = effort or ("low" if thinking is False else "medium")
        return kwargs

    def opening(self):
        return THINK_OPEN + "\n" if self.kind == "think" else HARMONY_ANALYSIS

    def closing(self):
        return "\n" + THINK_CLOSE + "\n\n" if self.kind == "think" else HARMONY_TO_FINAL

    def start(self, prompt):
        """Where an answer to `prompt` (the rendered text) begins: "answer" after a block the
        template closed (thinking off), "reasoning" inside one it opened, else "start"."""
        tail = prompt.rstrip()
        if self.kind == "harmony":
            return "reasoning" if tail.endswith(HARMONY_ANALYSIS) else "start"
        if tail.endswith(THINK_CLOSE):
            return "answer"
        return "reasoning" if tail.endswith(THINK_OPEN) else "start"


def reasoning_format(template):
    """A model's reasoning format from its chat template, or None (no reasoning)."""
    if not template:
        return None
    if "<|channel|>" in template and HARMONY_MESSAGE in template:
        return ReasoningFormat("harmony", "enable_thinking" in template, "reasoning_effort" in template)
    if THINK_CLOSE in template or THINK_OPEN in template:
        return ReasoningFormat("think", "enable_thinking" in template, "reasoning_effort" in template)
    return None


@dataclass
class Reasoning:
    """The reasoning part of one Generation: its format, where the answer begins, the tokens
    that close the block (fed when `budget` reasoning tokens are spent; None: no limit), and a
    grammar the answer after the thinking must follow."""

    format: ReasoningFormat
    state: str = "start"
    budget: int = None
    close_tokens: list = field(default_factory=list)
    answer_grammar: str = None

    def parser(self):
        return ReasoningParser(self.format.kind, self.state)


def _partial_suffix(text, marker):
    """How many characters at the end of `text` could begin `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


_HARMONY_HEADER_START = ("<|", "to=", " to=")


class ReasoningParser:
    """Splits one answer's text, as it is generated, into ("reasoning" | "answer", text)
    segments; harmony tool calls (`commentary to=functions.NAME`) are kept in `calls`. Text
    that may be the start of a marker is held until the next text decides it."""

    def __init__(self, kind, state="start"):
        self.kind = kind
        self.state = "header" if kind == "harmony" and state == "start" else state
        self.channel = "analysis" if kind == "harmony" and state == "reasoning" else None
        self.recipient = None
        self.fresh = True  # leading whitespace of a block or an answer is dropped
        self.buf = ""
        self.calls = []  # [{"name", "arguments": dict}]
        self._call_text = []
        self.answered = False  # some of the answer has been seen

    @property
    def thinking(self):
        """Whether the text now generated belongs to the reasoning."""
        if self.kind == "think":
            return self.state == "reasoning"
        if self.state == "header":
            return not self.answered and not self.calls
        return self.state == "message" and self.channel == "analysis"

    @property
    def answering(self):
        """Whether the answer itself has begun (where an answer grammar starts)."""
        if self.kind == "think":
            return self.state == "answer"
        return self.state == "raw" or (self.state == "message" and self.channel == "final")

    def feed(self, text):
        self.buf += text
        out = []
        step = self._think if self.kind == "think" else self._harmony
        while step(out):
            pass
        return [(k, t) for k, t in out if t]

    def finish(self):
        """The segments held back, at the end of the answer."""
        out, rest, self.buf = [], self.buf, ""
        if self.kind == "think":
            kind = "reasoning" if self.state == "reasoning" else "answer"
            text = rest.rstrip() if kind == "reasoning" else rest.strip() if self.fresh else rest
            out.append((kind, text))
        elif self.state == "message":
            self._emit(out, rest)
            self._end_message()
        elif self.state == "raw" or (rest.strip() and not rest.lstrip().startswith(_HARMONY_HEADER_START)):
            out.append(("answer", rest))  # a header cut short is no answer
        return [(k, t) for k, t in out if t]

    # -- <think>…</think> --

    def _think(self, out):
        """One step of the `<think>` parser; False when it waits for more text."""
        if self.state == "start":
            head = self.buf.lstrip()
            if not head:
                return False
            if head.startswith(THINK_OPEN):
                self.buf, self.state, self.fresh = head[len(THINK_OPEN):], "reasoning", True
                return True
            if THINK_OPEN.startswith(head):
                return False
            self.state = "answer"
            return True
        if self.fresh:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.fresh = False
        if self.state == "answer":
            self.answered = True
            out.append(("answer", self.buf))
            self.buf = ""
            return False
        at = self.buf.find(THINK_CLOSE)
        if at >= 0:
            out.append(("reasoning", self.buf[:at].rstrip()))
            self.buf, self.state, self.fresh = self.buf[at + len(THINK_CLOSE):], "answer", True
            return True
        self._hand_out(out, "reasoning", THINK_CLOSE)
        return False

    def _hand_out(self, out, kind, marker):
        """Hand out the text but what may begin `marker` (and reasoning's trailing whitespace,
        dropped if the marker follows)."""
        keep = _partial_suffix(self.buf, marker)
        ready = self.buf[:len(self.buf) - keep]
        if kind == "reasoning":
            keep += len(ready) - len(ready.rstrip())
            ready = ready.rstrip()
        out.append((kind, ready))
        self.buf = self.buf[len(self.buf) - keep:]

    # -- harmony --

    def _harmony(self, out):
        """One step of the harmony parser; False when it waits for more text."""
        if self.state == "raw":
            self.answered = True
            out.append(("answer", self.buf))
            self.buf = ""
            return False
        if self.state == "header":
            at = self.buf.find(HARMONY_MESSAGE)
            if at >= 0:
                self._header(self.buf[:at])
                self.buf, self.state, self.fresh = self.buf[at + len(HARMONY_MESSAGE):], "message", True
                return True
            head = self.buf.lstrip()
            if head and (len(self.buf) > 256 or not any(
                    head.startswith(p) or p.startswith(head) for p in _HARMONY_HEADER_START)):
                self.state = "raw"  # no channels: the text is all answer
                return True
            return False
        at = self.buf.find(HARMONY_END)
        if at >= 0:
            self._emit(out, self.buf[:at])
            self._end_message()
            self.buf, self.state = self.buf[at + len(HARMONY_END):], "header"
            return True
        keep = _partial_suffix(self.buf, HARMONY_END)
        self._emit(out, self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return False

    def _header(self, text):
        """A message's header: `<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json`."""
        # The last of each: a header the budget cut short is followed by the node's own.
        channels = re.findall(r"<\|channel\|>\s*(\w+)", text)
        self.channel = channels[-1] if channels else "final"
        recipients = re.findall(r"to=([^\s<]+)", text.split("<|start|>")[-1])
        self.recipient = recipients[-1] if recipients else None
        self._call_text = []

    def _emit(self, out, text):
        if not text:
            return
        if self.recipient is not None:
            self._call_text.append(text)
        elif self.channel == "analysis":
            if self.fresh:
                text = text.lstrip()
                self.fresh = not text
            out.append(("reasoning", text))
        else:
            if self.fresh and not self.answered:
                text = text.lstrip()
                self.fresh = not text
            self.answered = self.answered or bool(text)
            out.append(("answer", text))

    def _end_message(self):
        if self.recipient is None:
            return
        name = self.recipient.split(".", 1)[1] if self.recipient.startswith("functions.") else self.recipient
        try:
            arguments = json.loads("".join(self._call_text) or "{}", strict=False)
        except ValueError:
            arguments = None  # a call cut short (max_tokens) is no call
        if isinstance(arguments, dict):
            self.calls.append({"name": name, "arguments": arguments})
        self.recipient, self._call_text = None, []


def reasoning_controls(effort, where):
    """(thinking: False or None, effort: low/medium/high or None) of an effort field
    (OpenAI's `reasoning_effort`, `reasoning.effort`, Anthropic's `output_config.effort`):
    "none" turns thinking off, "minimal" is low, "max"/"xhigh" high."""
    if effort is None:
        return None, None
    levels = {"none": None, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
              "xhigh": "high", "max": "high"}
    if effort not in levels:
        raise InvalidRequest("'%s' must be one of %s" % (where, ", ".join(levels)))
    return (False if effort == "none" else None), levels[effort]


def harmony_tool_grammar(tools, choice):
    """A grammar for one harmony tool call, `<|channel|>commentary to=functions.NAME
    <|constrain|>json<|message|>{...}`, of the tool named (its arguments held to its schema)
    or of any tool (any JSON arguments)."""
    chosen = [t for t in tools if choice == "required" or t.name == choice]
    if len(chosen) == 1:
        return grammar(chosen[0].parameters, wrap=(
            "<|channel|>commentary to=functions.%s <|constrain|>json<|message|>" % chosen[0].name, ""))
    text = grammar(None)
    text = re.sub(r"^root ::=", "call-json ::=", text, flags=re.M)
    names_ = " | ".join(json.dumps(t.name) for t in chosen)
    return ('root ::= "<|channel|>commentary to=functions." ( %s ) " <|constrain|>json<|message|>" '
            'call-json\n%s' % (names_, text))


###############################################################################
# Node: model resolution and generation #######################################
###############################################################################

class ModelLoader:
    """Model names to weights in memory, verified: the manifest resolved (and repaired), the blob
    checked beside the load (in full first when its file changed), the pool that keeps models
    loaded; LLM_PRELOAD and readiness; each model's Modelfile layers. `read_weights(path,
    gpu_layers)` makes the Llama (with its Slots)."""

    def __init__(self, settings, store, repairs, guard, pool, metrics, read_weights):
        self.settings, self.store, self.repairs, self.guard = settings, store, repairs, guard
        self.pool, self.metrics, self.read_weights = pool, metrics, read_weights
        # Set once every LLM_PRELOAD model is verified and loaded (/ready); `errors` says why
        # not, while it is not.
        self.ready = threading.Event()
        self.errors = {}
        if not settings.preload:
            self.ready.set()

    def load(self, name, keep_alive=KEEP_DEFAULT, gpu_layers=None):
        """The loaded model for a name, its lock held: guard, repair if needed, load (with
        `gpu_layers` offloaded, when asked: Ollama's options.num_gpu). The caller must
        `release()` it."""
        ref = names.parse(name)
        manifest = self.repairs.manifest(ref)
        layer = model_layer(manifest)
        path = self.store.blob_path(layer["digest"])
        if self.settings.verify_on_load:
            # In memory, a model is used while its file is unchanged. A changed file is checked
            # (and repaired) in full first, every request for it waiting on that one check; the
            # load right after reads bytes just hashed, so they are not hashed a second time.
            # Any other load is verified alongside.
            if not self.guard.unchanged(layer):
                self.repairs.ensure(ref, on_change=self.pool.drop)
                return self.pool.acquire(path, lambda: self._load_checked(ref, path, gpu_layers),
                                         keep_alive, gpu_layers=gpu_layers)
            return self.pool.acquire(path, lambda: self._load_verified(ref, layer, path, gpu_layers),
                                     keep_alive, gpu_layers=gpu_layers)
        self.repairs.ensure(ref, on_change=self.pool.drop)
        return self.pool.acquire(path, lambda: self._load_checked(ref, path, gpu_layers), keep_alive,
                                 gpu_layers=gpu_layers)

    def _load_verified(self, ref, layer, path, gpu_layers):
        """Load the weights while the blob is verified (and repaired, if corrupted) on another
        thread: the request waits for the longer of the two, not their sum. Weights loaded
        from a blob that failed its check are dropped and the repaired blob is loaded (and
        verified) again."""
        for _attempt in range(3):
            # The check hashes on the cores the engine leaves (repair.hashing); the load (a
            # one-core copy) shares them.
            started = time.monotonic()
            check = in_thread(lambda since=started: (self.repairs.check_layer(ref, layer, gguf=True),
                                                     time.monotonic() - since), "verify-on-load")
            llm, load_error = None, None
            try:
                llm = self.read_weights(path, gpu_layers)
            except (ValueError, OSError, RuntimeError) as e:
                load_error = e
            loaded = time.monotonic() - started
            try:
                repaired, checked = outcome(check, self.settings.repair_timeout_secs + 60)
            except BaseException:
                if llm is not None:
                    close_model(llm)
                raise
            self.metrics.inc("llmnode_verified_loads_total")
            log.info("model %s: loaded in %.2fs, blob verified in %.2fs%s", ref, loaded,
                     checked, " (repaired)" if repaired else "")
            if repaired:
                if llm is not None:
                    close_model(llm)
                continue
            if load_error is not None:
                raise ModelLoadFailed("Failed to load model file %s: %s; the blob matches its "
                                      "digest, so the model itself cannot be loaded by this "
                                      "llama.cpp" % (os.path.basename(path), load_error)) from load_error
            return llm
        raise ModelLoadFailed("model %s was repaired and found corrupted again while loading" % ref)

    def _load_checked(self, ref, path, gpu_layers):
        """Load without a full verification (LLM_VERIFY_ON_LOAD=false): only a llama.cpp load
        failure leads to a full check."""
        try:
            return self.read_weights(path, gpu_layers)
        except (ValueError, OSError, RuntimeError) as e:
            log.warning("model %s failed to load; checking its blob in full", ref)
            if not self.repairs.ensure(ref, full=True).repaired:
                raise ModelLoadFailed("Failed to load model file %s: %s; the blob matches its "
                                      "digest, so the model itself cannot be loaded by this "
                                      "llama.cpp" % (os.path.basename(path), e)) from e
            return self.read_weights(path, gpu_layers)

    def preload(self, models):
        """Verify and load each LLM_PRELOAD model, keep it loaded, then set `ready`."""
        for name in models:
            self.errors[name] = "loading"
        for name in models:
            try:
                entry = self.load(name, gpu_layers=self.modelfile(name)[1].get("num_gpu"))
                self.pool.pin(entry.path)
                entry.release()
                del self.errors[name]
                log.info("preloaded model %s", name)
            except LLMNodeError as e:
                self.errors[name] = str(e)
                log.error("preload of model %s failed: %s", name, e)
        if not self.errors:
            self.ready.set()

    def models(self):
        """Every model in the store, as OpenAI's /v1/models lists it."""
        data = []
        for ref in self.store.models():
            st = os.stat(self.store.manifest_path(ref))
            data.append({"id": str(ref), "object": "model", "created": int(st.st_mtime),
                         "owned_by": ref.namespace})
        return data

    def modelfile(self, model):
        """(system prompt or None, params: option -> value) of a model's Modelfile layers, each
        checked against its digest (and repaired) before it is read; they apply on every dialect."""
        extras = self.repairs.layer_texts(names.parse(model))
        return extras.get("system") or None, params_layer(extras)


class Node:
    """The node: wires the store, the repair coordinator, the engine and the model loader
    together, and turns every dialect's checked request into Generations on a model's Slots."""

    def __init__(self, settings, session=None, loader=None, on_prompt=None, retry=None, step_hook=None,
                 on_generation=None, progress=LoggingProgress, auto_repair=None):
        self.settings = settings
        self.on_prompt = on_prompt  # called with each chat prompt's text, as the model reads it
        # Called with each chat Generation before it starts: tests force an answer's text with
        # a grammar, so a random-weight model writes a reasoning format's markers.
        self.on_generation = on_generation
        self.store = Store(settings.models_dir)
        self.client = RegistryClient(settings.registry_url, settings.insecure_registries,
                                     session=session, credentials=settings.registry_credentials,
                                     timeout=(10.0, float(settings.registry_timeout_secs)))
        self.metrics = Metrics()
        self.guard = IntegrityGuard(self.store, metrics=self.metrics)
        self.repairs = RepairCoordinator(self.store, self.client, self.guard,
                                         auto_repair=settings.auto_repair if auto_repair is None
                                         else auto_repair, progress=progress,
                                         timeout_secs=settings.repair_timeout_secs,
                                         max_waiters=settings.max_repair_waiters,
                                         connections=settings.download_connections,
                                         metrics=self.metrics, retry=retry)
        self.compute = ComputeThread()
        hashing.register_engine(self.compute)  # verify, scrub and repair yield to its sequences
        # Long prompts' KV states, saved under the store and restored verified (off at 0 bytes).
        self.prompt_cache = (Saver(PromptCache(self.store.root, settings.prompt_cache_bytes))
                             if settings.prompt_cache_bytes else None)
        raw_loader = loader or (lambda path, gpu_layers: load_llama(path, settings, gpu_layers))

        def load_with_slots(path, gpu_layers):
            llm = raw_loader(path, gpu_layers)
            try:
                llm.slots = Slots(llm, self.compute, settings.parallel, settings.n_ctx,
                                  settings.n_threads, self.metrics, step_hook=step_hook,
                                  kv=self.prompt_cache, cache_min=settings.prompt_cache_min,
                                  kv_type=settings.kv_cache_type,
                                  flash_attn=settings.flash_attention)
            except BaseException:
                llm.close()
                raise
            return llm

        # Loads run on a thread of their own, so the streams of the models in memory go on
        # meanwhile; one thread, as for compute, so that llama.cpp's OpenMP team (its weight
        # repacking computes) is made once, not on every request thread that loads.
        self.loads = ComputeThread(name="llama-load")
        # A model is freed on the compute thread, between decode steps.
        self.pool = ModelPool(settings.max_loaded_models, keep_alive=settings.keep_alive,
                              close=lambda llm: self.compute.post(lambda: close_model(llm)))
        self.loader = ModelLoader(settings, self.store, self.repairs, self.guard, self.pool, self.metrics,
                                  read_weights=lambda path, layers: self.loads.run(load_with_slots, path,
                                                                                   layers))
        # The loading side, as the routes reach it through the node.
        loader = self.loader
        self.load, self.preload, self.modelfile = loader.load, loader.preload, loader.modelfile
        self.models, self.ready, self.preload_errors = loader.models, loader.ready, loader.errors
        self.metadata = MetadataCache()  # of weights read after their check
        # The tokens of the prefixes clients mark for the prompt cache, by model and text: Claude
        # Code marks the same instructions and tools on every request, and reading them again
        # (13k tokens) was half the time of building its prompt (40 of 90 ms on SmolLM2).
        self.marked = Memo(8)

    # -- generation: every dialect's request ends here, as Generations on the model's Slots --

    def chat(self, req):
        """Start a checked `ChatRequest` (any dialect's): its `Answer`."""
        system, params = self.modelfile(req.model)
        req = with_system(req, system)
        modes = []  # the tool mode the prompt was rendered in

        def generations(entry):
            prompt, stop, gram, mode, reasoning, marks = self.chat_prompt(entry, req)
            modes.append(mode)
            gen = self._generation(entry, req, params, prompt, gram, stop, hold=mode is not None,
                                   logprobs=(req.top_logprobs or 0) if req.logprobs else -1)
            gen.reasoning, gen.save_at = reasoning, marks
            if self.on_generation is not None:
                self.on_generation(gen)
            return [gen]

        return self._run(req, params, generations, lambda run: Answer(run, req.tools, modes[0]))

    def complete(self, req):
        """Start a checked `CompletionRequest`: its `Answer` (its prompts' text in `prompts`)."""
        _system, params = self.modelfile(req.model)
        texts = []

        def generations(entry):
            gram = grammar(req.format_schema) if req.format is not None else None
            gens = []
            for prompt in req.prompts:
                tokens = prompt if isinstance(prompt, list) else entry.llm.tokenize(
                    prompt.encode("utf-8"), add_bos=True, special=False)
                _check_tokens(entry.llm, tokens, "prompt", self.settings.n_ctx)
                texts.append(prompt if isinstance(prompt, str) else
                             entry.llm.detokenize(prompt).decode("utf-8", "replace"))
                logprobs = req.logprobs if req.logprobs is not None else -1
                gens.append(self._generation(entry, req, params, tokens, gram, [], logprobs))
            return gens

        return self._run(req, params, generations, lambda run: Answer(run, prompts=texts))

    def _run(self, req, params, generations, answer):
        """Load the model (guard, repair; options.num_gpu, else the params layer's), start the
        request's generations on its Slots, and hand back `answer(run)`; the model is released
        when the answer ends, or here on an error."""
        started = time.monotonic()
        layers = req.gpu_layers if req.gpu_layers is not None else params.get("num_gpu")
        entry = self.load(req.model, req.keep_alive, layers)
        try:
            gens = generations(entry)
            run = EngineRun(self.compute, entry.llm.slots, gens, entry.release, gone=CLIENT_GONE.get())
            entry.llm.slots.submit(run)
        except BaseException:
            entry.release()
            raise
        run.timings["load"] = run.started - started
        return answer(run)

    def chat_prompt(self, entry, req, with_marks=True):
        """(prompt tokens, stop strings, grammar text or None, tool mode: None, "native",
        "harmony" or "generic", `Reasoning` or None, the prompt's lengths at the client's cache
        breakpoints: `with_marks`, and the prompt long enough to be saved) of a chat, as the
        model's own template renders it."""
        tools, gram, mode = None, None, None
        fmt = reasoning_format(getattr(entry.formatter, "template", None))
        offered = bool(req.tools) and req.tool_choice != "none"
        if offered and fmt is not None and fmt.kind == "harmony":
            mode = "harmony"  # the template renders the tools
            if req.tool_choice != "auto":
                gram = harmony_tool_grammar(req.tools, req.tool_choice)
        elif offered and renders_tools(entry.formatter):
            mode = "native"
            if req.tool_choice != "auto":
                gram = native_tool_grammar(req.tools, req.tool_choice)
        elif offered:
            schema = tool_call_schema(req.tools, req.tool_choice, req.format_schema)
            gram, mode = grammar(schema), "generic"
        elif req.format is not None:
            gram = grammar(req.format_schema)
        if mode in ("native", "harmony"):
            tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                        "parameters": t.parameters}} for t in req.tools]
        kwargs = dict(fmt.template_kwargs(req.thinking, req.effort) if fmt else {}, **req.template_kwargs)

        def render(conversation, tokens_of=None):
            messages = template_messages(conversation, native=mode in ("native", "harmony"))
            if mode == "generic":
                messages = with_tools(messages, req.tools, schema)
            return render_chat(entry.llm, entry.formatter, messages, tools, kwargs, tokens_of)

        def marked(text, add_bos, read):  # an agent marks the same prefix on every request
            return self.marked.get((entry.path, add_bos, text), read)

        tokens, stop, text = render(req.messages)
        reasoning = None
        if fmt is not None:
            tokens, gram, reasoning = self._reasoning(entry, req, fmt, tokens, text, gram, mode)
        marks = []  # of the prompt as read, thinking markers added; none where nothing is saved
        if with_marks and self.prompt_cache is not None and len(tokens) >= self.settings.prompt_cache_min:
            marks = cache_marks(req.messages, tokens, lambda part: render(part, marked))
        if self.on_prompt is not None:
            self.on_prompt(entry.llm.detokenize(tokens).decode("utf-8", "replace"))
        return tokens, stop, gram, mode, reasoning, marks

    def _reasoning(self, entry, req, fmt, tokens, text, gram, mode):
        """(prompt tokens, grammar from the first token, `Reasoning`) of a reasoning model's
        chat. A grammar (JSON format, tool call) is for the answer: it starts after the thinking,
        which the node opens in the prompt if the template did not (a harmony tool call's
        grammar holds the whole answer: the call is the message). The budget is the smaller of
        the request's and LLM_REASONING_BUDGET; thinking turned off where the template cannot
        turn it off is a budget of 0."""
        state = fmt.start(text)
        if state == "answer":
            return tokens, gram, None  # the template closed the block: no thinking

        def tokenize(marker):
            return entry.llm.tokenize(marker.encode("utf-8"), add_bos=False, special=True)

        budgets = [b for b in (req.budget, self.settings.reasoning_budget) if b is not None]
        budget = 0 if req.thinking is False and fmt.kind == "think" else min(budgets, default=None)
        answer_grammar = None
        if gram is not None and mode == "harmony":
            budget = None  # a forced call: the grammar holds the whole answer, with no thinking to end
        if gram is not None and mode != "harmony":
            answer_grammar, gram = gram, None
            if state == "start":
                tokens, state = tokens + tokenize(fmt.opening()), "reasoning"
        if budget == 0 and state == "reasoning":
            # Closed in the prompt: the answer (and its grammar) from the first token.
            return tokens + tokenize(fmt.closing()), answer_grammar, None
        return tokens, gram, Reasoning(fmt, state, budget, tokenize(fmt.closing()), answer_grammar)

    def _generation(self, entry, req, params, prompt, gram, stop, logprobs=-1, hold=False):
        """The engine's `Generation` of a prompt: the request's fields over the model's params
        layer over llama.cpp's server defaults."""
        n_ctx = self.settings.n_ctx
        _check_tokens(entry.llm, prompt, "prompt", n_ctx)
        budget = n_ctx - len(prompt) - CONTEXT_MARGIN
        if req.ctx_limit:
            budget = min(budget, req.ctx_limit - len(prompt))
        if budget < 1:
            raise ContextTooLong("The prompt (%d tokens) does not leave room for an answer in the "
                                 "context of %d tokens (LLM_CTX_SIZE)" % (len(prompt), n_ctx))
        if req.n > self.settings.parallel:
            raise UnsupportedParameter("'n' above %d (LLM_PARALLEL, the answers decoded at once) is "
                                       "not supported" % self.settings.parallel)
        chosen = dict(SAMPLING_DEFAULTS)
        for key in SAMPLING_FIELDS:
            value = getattr(req, key) if getattr(req, key) is not None else params.get(key)
            if value is not None:
                chosen[key] = value
        seed = req.seed if req.seed is not None else params.get("seed")
        seed = seed % (2 ** 32) if seed is not None else int.from_bytes(os.urandom(4), "little")
        vocab = entry.llm.n_vocab()
        if any(not 0 <= t < vocab for t in (req.logit_bias or {})):
            raise InvalidRequest("'logit_bias' names token ids outside the model's vocabulary (0-%d)"
                                 % (vocab - 1))
        sampling = Sampling(**chosen, seed=seed, logit_bias=req.logit_bias or {}, grammar=gram)
        asked = list(req.stop if req.stop is not None else params.get("stop") or [])
        wanted = req.max_tokens if req.max_tokens is not None else params.get("num_predict")
        if wanted is not None and wanted <= 0:
            wanted = None  # Ollama's -1 and -2: until the context ends
        return Generation(prompt=prompt, sampling=sampling, max_tokens=min(wanted or budget, budget),
                          stop=asked + [s for s in stop if s not in asked],
                          n=req.n, logprobs=logprobs, hold=hold, cache_key=req.cache_key)

    def embed(self, req):
        """Embeddings of each input, on the same loaded model (and guard) as generation:
        (vectors, tokens read). An input longer than the model reads is cut with `truncate`,
        else refused; `dimensions` keeps that many leading values, renormalised."""
        entry = self.load(req["model"], req.get("keep_alive", KEEP_DEFAULT), req.get("gpu_layers"))
        try:
            llm, field = entry.llm, req.get("field", "input")
            if rank_pooled(llm):
                raise InvalidRequest("model %s is a reranker: it scores a query against documents "
                                     "(POST /v1/rerank) and gives no embeddings" % req["model"])
            dims = req.get("dimensions")
            if dims is not None and dims > llm.n_embd():
                raise UnsupportedParameter("'dimensions' above the model's embedding size (%d) is not "
                                           "supported" % llm.n_embd())
            limit = min(embed_limit(llm, self.settings.embed_ctx_size), req.get("ctx_limit") or 1 << 31)
            vectors, used = [], 0
            for item in req["inputs"]:
                tokens = item if isinstance(item, list) else llm.tokenize(
                    item.encode("utf-8"), add_bos=True, special=False)
                tokens = fit_input(llm, tokens, field, limit, req.get("truncate"))
                vector = embed_tokens(llm, tokens, self.settings.embed_ctx_size, self.settings.n_threads,
                                      self.compute.run)
                vectors.append(shorten(vector, dims) if dims else vector)
                used += len(tokens)
        finally:
            entry.release()
        self.metrics.inc("llmnode_embedded_tokens_total", used)
        return vectors, used

    def chat_prompt_text(self, req):
        """The text of the prompt a checked chat request renders to, as `chat` renders it,
        special tokens as their text: what the model would read (apply-template)."""
        req = with_system(req, self.modelfile(req.model)[0])
        entry = self.load(req.model, req.keep_alive)
        try:
            tokens = self.chat_prompt(entry, req, with_marks=False)[0]
            return b"".join(token_piece(entry.llm, t) for t in tokens).decode("utf-8", "replace")
        finally:
            entry.release()


def fit_input(llm, tokens, field, limit, truncate):
    """An embedding or rerank input's tokens, checked against the vocabulary and `limit`: a
    longer input is cut with `truncate`, else refused (ContextTooLong)."""
    if not tokens:
        raise InvalidRequest("'%s' is empty" % field)
    vocab = llm.n_vocab()
    if any(not 0 <= t < vocab for t in tokens):
        raise InvalidRequest("'%s' holds token ids outside the model's vocabulary (0-%d)"
                             % (field, vocab - 1))
    if len(tokens) > limit:
        if not truncate:
            raise ContextTooLong("input exceeds maximum context length: '%s' has %d tokens, the model "
                                 "reads at most %d (its trained context, at most LLM_EMBED_CTX_SIZE)"
                                 % (field, len(tokens), limit))
        tokens = tokens[:limit]
    return tokens


def shorten(vector, dims):
    """The first `dims` values of a vector, renormalised to unit length (Matryoshka truncation)."""
    head = vector[:dims]
    norm = sum(x * x for x in head) ** 0.5
    return [x / norm for x in head] if norm else head


def rank_pooled(llm):
    """Whether a loaded model's GGUF names rank pooling: a reranker's classifier head."""
    import llama_cpp as C

    return llm.pooling_type() == C.LLAMA_POOLING_TYPE_RANK


def _check_tokens(llm, tokens, what, limit):
    limit = limit - CONTEXT_MARGIN - 1
    if not tokens:
        raise InvalidRequest("'%s' is empty" % what)
    if len(tokens) > limit:
        raise ContextTooLong("'%s' has %d tokens; at most %d fit (LLM_CTX_SIZE)" % (what, len(tokens), limit))
    vocab = llm.n_vocab()
    if any(not 0 <= t < vocab for t in tokens):
        raise InvalidRequest("'%s' holds token ids outside the model's vocabulary (0-%d)" % (what, vocab - 1))


def in_thread(fn, name):
    """Run `fn` on a thread of its own: its `concurrent.futures.Future`."""
    future = Future()

    def run():
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: B036 - handed to the waiting thread
                future.set_exception(e)

    threading.Thread(target=run, daemon=True, name=name).start()
    return future


def outcome(future, timeout):
    """The future's result, waited for at most `timeout` seconds (a repair's deadline)."""
    try:
        return future.result(timeout)
    except FuturesTimeout:
        raise RepairTimeout() from None


###############################################################################
# HTTP: the app, the API key, errors and event streams ########################
###############################################################################

@dataclass(frozen=True)
class Dialect:
    """How one API speaks: the body of its errors, and how its streams are framed."""

    name: str
    error: object  # LLMNodeError -> the error's body (a dict)
    frame: object  # one event (a dict) -> the text sent for it
    stream_type: str = "text/event-stream"
    end: str = ""  # sent after the last event
    stream_error: object = None  # LLMNodeError -> a stream's last event after the 200 (else its body)

    def error_frame(self, err):
        """An error after the 200 went out, as the stream's own last event."""
        return self.frame((self.stream_error or self.error)(err))


def _sse_data(event):
    return "data: %s\n\n" % json.dumps(event)


def _sse_named(event):
    return "event: %s\ndata: %s\n\n" % (event["type"], json.dumps(event))


# OpenAI's chat, completions and embeddings: errors `{"error": {...}}`, streams of `data:` lines.
OPENAI = Dialect("openai", lambda err: err.body(), _sse_data, end="data: [DONE]\n\n")


# Which dialect answers the errors of a path no route matched (and the API key's 401): the
# longest registered prefix; OpenAI's elsewhere. Each dialect's section registers its own.
DIALECT_PREFIXES = {}


def dialect_of(path):
    prefixes = [p for p in DIALECT_PREFIXES if path == p or path.startswith(p.rstrip("/") + "/")]
    return DIALECT_PREFIXES[max(prefixes, key=len)] if prefixes else OPENAI


def error_response(err, dialect):
    """Set the status and headers of an error and return its body, in the dialect's shape."""
    bottle.response.status = err.status
    bottle.response.content_type = "application/json"
    if err.retry_after:
        bottle.response.set_header("Retry-After", str(err.retry_after))
    return json.dumps(dialect.error(err))


def make_app(node):
    """The WSGI app: the Bottle routes behind the API key check and the request counter, with
    CORS answered in front of both."""
    return cors(guarded(routes(node), node.settings.api_key, node.metrics), node.settings.cors_origins)


# What a preflight allows: every method a route takes; the headers are the ones the browser asks
# for (an SDK's own, Authorization for LLM_API_KEY), or these when it names none.
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, x-api-key, anthropic-version"


def cors(app, origins):
    """Answer browsers from LLM_CORS_ORIGINS (patterns, `*` matching anything): every OPTIONS
    (a preflight, which carries no API key) here, with the methods and headers allowed; every
    other answer, errors and event streams included, with Access-Control-Allow-Origin when the
    request's Origin is allowed. A disallowed origin gets no CORS header, so its page cannot read
    the answer."""
    any_origin = "*" in origins
    patterns = [re.compile(".*".join(re.escape(p) for p in o.split("*")), re.I) for o in origins]

    def allowed(origin):
        return origin if any(p.fullmatch(origin) for p in patterns) else None

    def wsgi(environ, start_response):
        origin = environ.get("HTTP_ORIGIN", "")
        allow = ("*" if any_origin else allowed(origin)) if origin else None
        granted = [("Access-Control-Allow-Origin", allow)] if allow else []
        if allow and not any_origin:
            granted.append(("Vary", "Origin"))
        if environ.get("REQUEST_METHOD") == "OPTIONS":
            headers = [("Allow", CORS_METHODS), ("Content-Length", "0")] + granted
            if allow:
                asked = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "").strip()
                headers += [("Access-Control-Allow-Methods", CORS_METHODS),
                            ("Access-Control-Allow-Headers", asked or CORS_HEADERS),
                            ("Access-Control-Max-Age", "600")]
            start_response("204 No Content", headers)
            return [b""]
        if not allow:
            return app(environ, start_response)

        def with_origin(status, headers, exc_info=None):
            return start_response(status, list(headers) + granted, exc_info)

        return app(environ, with_origin)

    return wsgi


def guarded(app, api_key, metrics):
    """Refuse requests without the API key (but /health), and count answers by status."""
    expected = ("Bearer " + api_key).encode() if api_key else None
    expected_key = api_key.encode() if api_key else None  # Anthropic's x-api-key header

    def wsgi(environ, start_response):
        def counting_start_response(status, headers, exc_info=None):
            metrics.inc("llmnode_requests_total", status=status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        # An answer nobody waits for any more stops (waitress's callable, with a lookahead set).
        CLIENT_GONE.set(environ.get("waitress.client_disconnected"))
        if expected and environ.get("PATH_INFO") != "/health":
            given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
            given_key = environ.get("HTTP_X_API_KEY", "").encode("latin-1", "replace")
            if not (hmac.compare_digest(given, expected) or hmac.compare_digest(given_key, expected_key)):
                err = Unauthorized("Missing or wrong API key: send Authorization: Bearer <LLM_API_KEY> "
                                   "or x-api-key: <LLM_API_KEY>")
                body = json.dumps(dialect_of(environ.get("PATH_INFO", "")).error(err)).encode()
                counting_start_response("401 Unauthorized", [
                    ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("WWW-Authenticate", 'Bearer realm="llmnode"')])
                return [body]
        return app(environ, counting_start_response)

    return wsgi


# Every route is one module-level function of the node (and the URL's parts), registered with
# @route and its dialect; `routes` puts them all on one Bottle app behind the error handling they share.
ROUTES = []


def route(method, path, dialect=OPENAI, plain=False):
    """Register a route of a dialect. A `plain` one (health, readiness, metrics) is answered
    without the API routes' error handling and endpoint count."""
    def register(handler):
        ROUTES.append((method, path, handler, dialect, plain))
        return handler
    return register


def routes(node):
    """The Bottle app of every registered route: every answer, errors included, is JSON."""
    app = bottle.Bottle(catchall=True, autojson=True)
    app.default_error_handler = lambda res: bottle_error(res, node.settings.max_body_bytes)
    for method, path, handler, dialect, plain in ROUTES:
        app.route(path, method, plain_call(node, handler) if plain else api_call(node, handler, dialect))
    return app


def plain_call(node, handler):
    def call(**parts):
        return handler(node, **parts)
    return call


def api_call(node, handler, dialect):
    """An API route: counted by endpoint; the node's errors answered in the dialect's shape."""
    def call(**parts):
        node.metrics.inc("llmnode_endpoint_requests_total", endpoint=bottle.request.route.rule)
        try:
            return handler(node, **parts)
        except LLMNodeError as e:
            log.log(logging.ERROR if e.status >= 500 else logging.INFO,
                    "%s %s -> %d %s", bottle.request.method, bottle.request.path, e.status, e)
            return error_response(e, dialect)
    return call


def bottle_error(res, limit):
    """Bottle's own errors (no route, wrong method, too large, an unhandled exception) as the
    node's; an unhandled exception is logged with its traceback."""
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
    return error_response(err, dialect_of(bottle.request.path))


def read_json(node):
    """The request's JSON body, at most LLM_MAX_BODY_BYTES."""
    limit = node.settings.max_body_bytes
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


def report_ignored(ignored):
    """Name the request's fields that no real API has (left alone) in the answer's
    `llmnode-ignored-fields` header and one log line, so a typo is found and a new client's
    field breaks nothing."""
    if ignored:
        names_ = ", ".join(ignored)
        bottle.response.set_header("llmnode-ignored-fields", names_)
        log.info("%s %s: ignored fields no API has: %s", bottle.request.method, bottle.request.path, names_)


def stream(dialect, events, answer=None):
    """An answer's events as the dialect's stream; an error after the 200 went out becomes the
    stream's last event, and a client that leaves stops the answer (even before it started)."""
    bottle.response.content_type = dialect.stream_type
    bottle.response.set_header("Cache-Control", "no-cache")
    return frames(dialect, events, answer)


def frames(dialect, events, answer):
    try:
        for event in events:
            yield dialect.frame(event)
    except Exception as e:
        if not isinstance(e, LLMNodeError):
            log.exception("stream failed")
            e = LLMNodeError("Stream failed: %s" % e)
        yield dialect.error_frame(e)
    finally:
        closing(events, answer)
    if dialect.end:
        yield dialect.end


def closing(*streams):
    """Close each (a client gone before or while its answer streamed: the answer is stopped and
    its model released, even if the stream never started)."""
    for s in streams:
        if hasattr(s, "close"):
            s.close()


###############################################################################
# OpenAI dialect ##############################################################
###############################################################################
# /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models: each body checked into the
# request type (errors name OpenAI's fields), the answer rendered back as OpenAI's objects.
# Every field OpenAI documents is known here: honoured, or accepted (changing nothing here, as
# README's table says); a field no API has is ignored and named (`report_ignored`).

ROLES = ("system", "user", "assistant", "tool", "developer")


# Fields that change nothing in the answer here: accepted and left alone (README's tables).
OPENAI_ACCEPTED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_retention",
                   "parallel_tool_calls", "prediction", "verbosity", "web_search_options", "modalities",
                   )


CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
               "seed", "stop", "stream", "stream_options", "response_format", "tools", "tool_choice",
               "presence_penalty", "frequency_penalty", "logit_bias", "n", "logprobs", "top_logprobs",
               "prompt_cache_key", "audio", "functions", "function_call", "reasoning_effort",
               "chat_template_kwargs",
               # llama.cpp's server's own sampling fields, honoured as it does
               "top_k", "min_p", "repeat_penalty") + OPENAI_ACCEPTED


COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                     "stream_options", "echo", "presence_penalty", "frequency_penalty", "logit_bias",
                     "n", "best_of", "logprobs", "suffix", "top_k", "min_p",
                     "repeat_penalty") + OPENAI_ACCEPTED


EMBEDDING_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")


_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio",
                   "function_call", "reasoning_content")


def _content(i, message, ignored):
    """A message's text: a string, or its text (and refusal) parts; an image, audio or file part
    is refused by name (this node reads text only)."""
    content = message.get("content")
    where = "messages[%d].content" % i
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("'%s' must be a string or a list of text parts" % where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "input_audio", "file"):
            raise UnsupportedParameter("'%s[%d].type' %s is not supported: this node reads text only"
                                       % (where, j, kind))
        text = part.get("refusal" if kind == "refusal" else "text") if kind in ("text", "refusal") else None
        if not isinstance(text, str):
            raise InvalidRequest("'%s[%d]' must be a text part" % (where, j))
        unknown_fields(part, ("type", "text", "refusal", "cache_control"), "%s[%d]" % (where, j), ignored)
        texts.append(text)
    return "".join(texts)


def _sampling_fields(req):
    """The sampling fields both generation routes share, checked."""
    n = _integer(req, "n", 1, 128)
    return dict(temperature=_number(req, "temperature", 0, 2), top_p=_number(req, "top_p", 0, 1),
                top_k=_integer(req, "top_k", 0, 2 ** 31 - 1), min_p=_number(req, "min_p", 0, 1),
                repeat_penalty=_number(req, "repeat_penalty", 0, 100),
                seed=_integer(req, "seed", -(2 ** 63), 2 ** 64 - 1), stop=_stop(req),
                presence_penalty=_number(req, "presence_penalty", -2, 2),
                frequency_penalty=_number(req, "frequency_penalty", -2, 2),
                logit_bias=_logit_bias(req), stream=_bool(req, "stream"), include_usage=_include_usage(req),
                n=n or 1)


def _include_usage(req):
    options = req.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object")
    if not req.get("stream"):
        raise InvalidRequest("'stream_options' is only allowed with 'stream': true")
    return _bool(options, "include_usage", where="stream_options.include_usage")


def _response_format(req):
    """(format: None, "json" or "schema", its JSON schema or None, strict)."""
    fmt = req.get("response_format")
    if fmt is None:
        return None, None, False
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest("'response_format.type' must be text, json_object or json_schema")
    if fmt["type"] == "text":
        return None, None, False
    if fmt["type"] == "json_object":
        return "json", None, False
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise InvalidRequest("'response_format.json_schema.schema' must be a JSON schema object")
    strict = _bool(spec, "strict", where="response_format.json_schema.strict")
    kind, schema = format_schema(spec.get("schema") or {"type": "object"},
                                 "response_format.json_schema.schema", strict)
    return kind, schema, strict


def _arguments(i, call):
    """A tool call's arguments (OpenAI's JSON string) as an object."""
    args = call["function"].get("arguments") or "{}"
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise InvalidRequest("'messages[%d].tool_calls' arguments must be JSON" % i) from None
    return args if isinstance(args, dict) else {"input": args}


def _openai_message(i, m, ignored):
    """One OpenAI chat message as a `Message` (a developer message is a system one)."""
    unknown_fields(m, _MESSAGE_FIELDS, "messages[%d]" % i, ignored)
    role = "system" if m["role"] == "developer" else m["role"]
    if m.get("audio") is not None:
        raise UnsupportedParameter("'messages[%d].audio' is not supported: this node reads text only" % i)
    if role == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls):
            raise InvalidRequest("'messages[%d].tool_calls' must be a list of function calls" % i)
        return Message("assistant", _content(i, m, ignored), [
            ToolCall(c.get("id") or "call_%d" % k, c["function"]["name"], _arguments(i, c))
            for k, c in enumerate(calls)], reasoning=_reasoning_content(i, m))
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise InvalidRequest("'messages[%d].tool_call_id' is required for a tool message" % i)
        return Message("tool", _content(i, m, ignored), tool_call_id=m["tool_call_id"],
                       name=m["name"] if isinstance(m.get("name"), str) else None)
    return Message(role, _content(i, m, ignored),
                   reasoning=_reasoning_content(i, m) if role == "assistant" else "")


def _reasoning_content(i, m):
    """An assistant message's thinking sent back (llama.cpp's `reasoning_content`), or ""."""
    thought = m.get("reasoning_content") or ""
    if not isinstance(thought, str):
        raise InvalidRequest("'messages[%d].reasoning_content' must be a string" % i)
    return thought


def validate_chat(req, n_ctx):
    """Check a chat completion body into a `ChatRequest`."""
    model = _model(req)
    ignored = []
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequest("'messages[%d].role' must be one of %s" % (i, ", ".join(ROLES)))
        clean.append(_openai_message(i, m, ignored))
    unknown_fields(req, CHAT_FIELDS, "", ignored)
    refuse(req, "functions", lambda v: False, "the deprecated functions API: send 'tools'")
    refuse(req, "function_call", lambda v: False, "the deprecated functions API: send 'tool_choice'")
    refuse(req, "audio", lambda v: False, "this node answers in text only")
    refuse(req, "modalities", lambda v: v == ["text"], "this node answers in text only")
    fields = _sampling_fields(req)
    logprobs = _bool(req, "logprobs")
    top_logprobs = _integer(req, "top_logprobs", 0, 20)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true")
    _bool(req, "parallel_tool_calls", True)
    max_tokens = req.get("max_tokens")
    if max_tokens is None:
        max_tokens = req.get("max_completion_tokens")
    fmt, schema, strict = _response_format(req)
    tools, choice = function_tools(req, ignored)
    key = req.get("prompt_cache_key")
    if key is not None and not isinstance(key, str):
        raise InvalidRequest("'prompt_cache_key' must be a string")
    kwargs = req.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InvalidRequest("'chat_template_kwargs' must be an object")
    thinking, effort = reasoning_controls(req.get("reasoning_effort"), "reasoning_effort")
    if isinstance(kwargs.get("enable_thinking"), bool):
        thinking = kwargs["enable_thinking"]
    return ChatRequest(model=model, messages=clean, tools=tools, tool_choice=choice, format=fmt,
                       format_schema=schema, strict_format=strict, logprobs=logprobs,
                       top_logprobs=top_logprobs, cache_key=key, ignored=ignored, thinking=thinking,
                       effort=effort, template_kwargs=kwargs,
                       max_tokens=_integer({"max_tokens": max_tokens}, "max_tokens", 1, n_ctx), **fields)


def validate_completion(req, n_ctx):
    """Check a text completion body into a `CompletionRequest`."""
    model = _model(req)
    ignored = []
    prompt = req.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and len(prompt) <= 16 and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p)) for p in prompt):
        prompts = prompt
    else:
        raise InvalidRequest("'prompt' must be a string, a list of up to 16 strings, or token arrays")
    unknown_fields(req, COMPLETION_FIELDS, "", ignored)
    refuse(req, "suffix", lambda v: v == "", "this node does not do fill-in-the-middle")
    refuse(req, "best_of", lambda v: v == 1, "only one candidate is generated per choice")
    fields = _sampling_fields(req)
    max_tokens = _integer(req, "max_tokens", 1, n_ctx)
    return CompletionRequest(model=model, prompts=prompts, echo=_bool(req, "echo"),
                             logprobs=_integer(req, "logprobs", 0, 5), ignored=ignored,
                             max_tokens=16 if max_tokens is None else max_tokens, **fields)


def validate_embeddings(req):
    """Check an embeddings body."""
    model = _model(req)
    value = req.get("input")

    def tokens(v):
        return isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str) or tokens(value):
        inputs = [value]
    elif isinstance(value, list) and value and len(value) <= 2048 and all(
            isinstance(v, str) or tokens(v) for v in value):
        inputs = value
    else:
        raise InvalidRequest("'input' must be a string, a list of strings, or token arrays")
    if any(isinstance(v, str) and not v for v in inputs):
        raise InvalidRequest("'input' must not hold empty strings")
    ignored = []
    unknown_fields(req, EMBEDDING_FIELDS, "", ignored)
    report_ignored(ignored)
    fmt = req.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64")
    # An input longer than the model reads is a 400, as OpenAI answers it (truncate: False).
    return {"model": model, "inputs": inputs, "encoding_format": fmt, "truncate": False,
            "dimensions": _integer(req, "dimensions", 1, 1 << 16)}


def openai_tool_calls(message):
    """An answer's tool calls as OpenAI's: arguments as a JSON string."""
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in message.tool_calls]


def openai_message(message, reasoning=""):
    """An answer's `Message` as OpenAI's assistant message (content null beside tool calls alone),
    a reasoning model's thinking in `reasoning_content` (llama.cpp's name)."""
    out = {"role": "assistant", "content": message.content or (None if message.tool_calls else "")}
    if reasoning:
        out["reasoning_content"] = reasoning
    if message.tool_calls:
        out["tool_calls"] = openai_tool_calls(message)
    return out


def openai_chat_result(answer, req):
    """A finished answer as a chat.completion."""
    ended, logprobs = answer.collect()
    choices = [{"index": i, "message": openai_message(ended[i].message, ended[i].reasoning),
                "finish_reason": ended[i].reason,
                "logprobs": chat_logprobs(logprobs.get(i, [])) if req.logprobs else None}
               for i in sorted(ended)]
    return {"id": "chatcmpl-%s" % os.urandom(12).hex(), "object": "chat.completion",
            "created": int(time.time()), "model": req.model, "choices": choices,
            "usage": answer.usage.openai()}


def openai_chat_chunks(answer, req):
    """An answer as chat.completion.chunk objects; a tool mode's message comes whole at its end."""
    head = {"id": "chatcmpl-%s" % os.urandom(12).hex(), "object": "chat.completion.chunk",
            "created": int(time.time()), "model": req.model}
    for i in range(answer.choices):
        yield dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}])
    for event in answer:
        if isinstance(event, Piece) and event.kind == "reasoning":
            yield dict(head, choices=[{"index": event.index, "delta": {"reasoning_content": event.text},
                                       "logprobs": None, "finish_reason": None}])
            continue
        if isinstance(event, Piece):
            lp = chat_logprobs(event.logprobs) if req.logprobs else None
            yield dict(head, choices=[{"index": event.index, "delta": {"content": event.text},
                                       "logprobs": lp, "finish_reason": None}])
            continue
        if answer.held:  # a tool mode: the parsed message, whole
            delta = {"content": event.message.content or None}
            if event.message.tool_calls:
                delta["tool_calls"] = [dict(call, index=k)
                                       for k, call in enumerate(openai_tool_calls(event.message))]
            yield dict(head, choices=[{"index": event.index, "delta": delta, "logprobs": None,
                                       "finish_reason": None}])
        yield dict(head, choices=[{"index": event.index, "delta": {}, "logprobs": None,
                                   "finish_reason": event.reason}])
    if req.include_usage:
        yield dict(head, choices=[], usage=answer.usage.openai())


def openai_completion_result(answer, req):
    ended, logprobs = answer.collect()
    echo = _echoed(answer, req)
    choices = [{"index": i, "text": echo.get(i, "") + ended[i].text,
                "logprobs": completion_logprobs(logprobs.get(i, [])) if req.logprobs is not None
                else None, "finish_reason": ended[i].reason} for i in sorted(ended)]
    return {"id": "cmpl-%s" % os.urandom(12).hex(), "object": "text_completion",
            "created": int(time.time()), "model": req.model, "choices": choices,
            "usage": answer.usage.openai()}


def openai_completion_chunks(answer, req):
    head = {"id": "cmpl-%s" % os.urandom(12).hex(), "object": "text_completion",
            "created": int(time.time()), "model": req.model}
    for i, text in sorted(_echoed(answer, req).items()):
        yield dict(head, choices=[{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
    for event in answer:
        if isinstance(event, Piece):
            lp = completion_logprobs(event.logprobs) if req.logprobs is not None else None
            yield dict(head, choices=[{"index": event.index, "text": event.text, "logprobs": lp,
                                       "finish_reason": None}])
        else:
            yield dict(head, choices=[{"index": event.index, "text": "", "logprobs": None,
                                       "finish_reason": event.reason}])
    if req.include_usage:
        yield dict(head, choices=[], usage=answer.usage.openai())


def _echoed(answer, req):
    """{choice index: its prompt's text} with `echo`, else {}."""
    return {i: answer.prompts[i // req.n] for i in range(answer.choices)} if req.echo else {}


@route("GET", "/v1/models")
def openai_models(node):
    return {"object": "list", "data": node.models()}


@route("GET", "/v1/models/<name:path>")
def openai_model(node, name):
    ref = names.parse(name)
    found = [m for m in node.models() if m["id"] == str(ref) or m["id"] == name]
    if not found:
        raise ModelNotFound(name)
    return dict(found[0], id=name)


@route("POST", "/v1/chat/completions")
def openai_chat(node):
    req = validate_chat(read_json(node), node.settings.n_ctx)
    report_ignored(req.ignored)
    started = time.monotonic()
    answer = node.chat(req)
    if not req.stream:
        result = openai_chat_result(answer, req)
        log.info("chat %s: %d tokens in %.2fs", req.model,
                 result["usage"]["completion_tokens"], time.monotonic() - started)
        return result
    return stream(OPENAI, openai_chat_chunks(answer, req), answer)


@route("POST", "/v1/completions")
def openai_completions(node):
    req = validate_completion(read_json(node), node.settings.n_ctx)
    report_ignored(req.ignored)
    answer = node.complete(req)
    if not req.stream:
        return openai_completion_result(answer, req)
    return stream(OPENAI, openai_completion_chunks(answer, req), answer)


@route("POST", "/v1/embeddings")
def openai_embeddings(node):
    req = validate_embeddings(read_json(node))
    vectors, used = node.embed(req)
    return {"object": "list", "model": req["model"],
            "data": [{"object": "embedding", "index": i,
                      "embedding": encode_vector(v, req["encoding_format"])} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": used, "total_tokens": used}}


def encode_vector(vector, encoding):
    """A vector as a JSON list of floats, or base64 of its little-endian float32s (OpenAI's)."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack("<%df" % len(vector), *vector)).decode("ascii")


###############################################################################
# Responses dialect ###########################################################
###############################################################################
# OpenAI's Responses API, stateless: a translation at the edge, as the Ollama dialect is. `input`
# items become OpenAI-shaped chat messages and then the one internal request; the one result
# becomes output items, or the Responses event sequence. Nothing is stored, so whatever needs a
# stored response (`previous_response_id`, `conversation`, `background`) is refused by name.
# Errors are OpenAI's shape, as in /v1/chat/completions.

# Fields that change nothing in the answer here: accepted and left alone (README's tables).
RESPONSES_ACCEPTED = ("store", "metadata", "user", "include", "truncation", "service_tier",
                      "safety_identifier", "prompt_cache_retention", "client_metadata", "parallel_tool_calls",
                      "max_tool_calls")


RESPONSES_FIELDS = ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
                    "tools", "tool_choice", "text", "stream", "stream_options", "top_logprobs",
                    "previous_response_id", "conversation", "background", "prompt",
                    "prompt_cache_key", "reasoning") + RESPONSES_ACCEPTED


# Tools the Responses API runs itself: accepted, and not offered to the model (none runs here).
BUILTIN_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use",
                 "computer_use_preview", "mcp", "image_generation", "local_shell", "shell", "apply_patch",
                 "tool_search")


# Items of earlier turns that need no rendering: the calls of built-in tools, which did not run
# on this node.
_SKIPPED_ITEMS = ("web_search_call", "file_search_call", "image_generation_call",
                  "code_interpreter_call", "computer_call", "computer_call_output", "local_shell_call",
                  "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call",
                  "apply_patch_call_output", "mcp_call", "mcp_list_tools", "mcp_approval_request",
                  "mcp_approval_response", "tool_search_call", "tool_search_output", "compaction")


_RESPONSE_ITEM_KEYS = {"message": ("type", "role", "content", "id", "status"),
                       "function_call": ("type", "call_id", "name", "arguments", "id", "status", "namespace"),
                       "function_call_output": ("type", "call_id", "output", "id", "status", "name",
                                                "namespace"),
                       "custom_tool_call": ("type", "call_id", "name", "input", "id", "status"),
                       "custom_tool_call_output": ("type", "call_id", "output", "id", "status"),
                       "reasoning": ("type", "id", "summary", "content", "encrypted_content", "status")}


def _text_parts(where, content, kinds, ignored):
    """The text of a string, or of a list of parts of the given types; an image, file or audio
    part is refused by name (this node reads text only)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("'%s' must be a string or an array of content parts" % where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio", "image", "document"):
            raise UnsupportedParameter("'%s[%d].type' %s is not supported: this node reads text only"
                                       % (where, j, kind))
        text = part.get("refusal" if kind == "refusal" else "text") if isinstance(part, dict) else None
        if kind not in kinds + ("refusal",) or not isinstance(text, str):
            raise InvalidRequest("'%s[%d]' must be a text part (%s)" % (where, j, ", ".join(kinds)))
        unknown_fields(part, ("type", "text", "refusal", "annotations", "logprobs"), "%s[%d]" % (where, j),
                       ignored)
        texts.append(text)
    return "".join(texts)


def _append_call(messages, call, reasoning=""):
    """A call of the conversation, in the assistant turn before it if that made calls too (with
    the thinking before it)."""
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant" and last.tool_calls:
        last.tool_calls.append(call)  # parallel calls: one assistant turn
        last.reasoning += reasoning
    else:
        messages.append(Message("assistant", "", [call], reasoning=reasoning))


def responses_messages(body, ignored):
    """`instructions` and `input` as `Message`s."""
    instructions, items = body.get("instructions"), body.get("input")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string")
    messages = [Message("system", instructions)] if instructions else []
    thought = []  # reasoning items' text, for the next assistant turn
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise InvalidRequest("'input' must be a string or a non-empty array of items")
    parts = ("input_text", "output_text")
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind in _SKIPPED_ITEMS:
            continue
        if kind == "item_reference":
            raise UnsupportedParameter("'input[%d].type' item_reference is not supported: no state is "
                                       "kept here; send the item itself" % i)
        if kind not in _RESPONSE_ITEM_KEYS:
            raise InvalidRequest("'input[%d]' must be a message, function_call, function_call_output, "
                                 "custom_tool_call or custom_tool_call_output" % i)
        unknown_fields(item, _RESPONSE_ITEM_KEYS[kind], "input[%d]" % i, ignored)
        if kind == "reasoning":
            # Its text goes back with the assistant turn that follows (summaries and encrypted
            # content are another model's: nothing to render).
            thought.append(_text_parts("input[%d].content" % i, item.get("content") or [],
                                       ("reasoning_text",), ignored))
            continue
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest("'input[%d].role' must be user, assistant, system or developer" % i)
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append(Message(role, _text_parts("input[%d].content" % i, item.get("content"), parts,
                                                      ignored),
                                    reasoning="".join(thought) if role == "assistant" else ""))
            thought = [] if role == "assistant" else thought
            continue
        if kind in ("function_call_output", "custom_tool_call_output"):
            # Codex also sends outputs that answer no call (a tool of its own, named): by name.
            call_id = item.get("call_id") or item.get("name")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest("'input[%d].call_id' must be a string" % i)
            messages.append(Message("tool", _text_parts("input[%d].output" % i, item.get("output"), parts,
                                                        ignored), tool_call_id=call_id,
                                    name=item.get("name") if isinstance(item.get("name"), str) else None))
            continue
        if not isinstance(item.get("call_id"), str) or not item["call_id"]:
            raise InvalidRequest("'input[%d].call_id' must be a string" % i)
        if not isinstance(item.get("name"), str):
            raise InvalidRequest("'input[%d].name' must be a string" % i)
        if kind == "custom_tool_call":
            if not isinstance(item.get("input"), str):
                raise InvalidRequest("'input[%d].input' must be a string" % i)
            _append_call(messages, ToolCall(item["call_id"], item["name"], {"input": item["input"]}),
                         "".join(thought))
            thought = []
            continue
        if not isinstance(item.get("arguments"), str):
            raise InvalidRequest("'input[%d].arguments' must be a JSON string" % i)
        try:
            args = json.loads(item["arguments"])
        except ValueError:
            raise InvalidRequest("'input[%d].arguments' must be JSON" % i) from None
        _append_call(messages, ToolCall(item["call_id"], item["name"],
                                        args if isinstance(args, dict) else {"input": args}),
                     "".join(thought))
        thought = []
    return messages


def _responses_tool(where, tool, ignored):
    """The `Tool`s of one Responses tool: a function, a custom (free-form) tool, or a namespace's
    functions; a built-in tool offers none (it does not run here)."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind in BUILTIN_TOOLS or (isinstance(kind, str) and kind.startswith(BUILTIN_TOOLS)):
        return []
    if kind == "namespace":
        unknown_fields(tool, ("type", "name", "description", "tools"), where, ignored)
        inner = tool.get("tools")
        if not isinstance(inner, list):
            raise InvalidRequest("'%s.tools' must be an array" % where)
        return [replace(t, namespace=tool.get("name")) for j, sub in enumerate(inner)
                for t in _responses_tool("%s.tools[%d]" % (where, j), sub, ignored)]
    if kind == "custom":
        unknown_fields(tool, ("type", "name", "description", "format", "defer_loading"), where, ignored)
        return [replace(function_tool(where, tool.get("name"), tool.get("description"), FREE_FORM_INPUT),
                        kind="custom")]
    if kind != "function":
        raise InvalidRequest("'%s.type' must be function, custom, namespace or a built-in tool" % where)
    unknown_fields(tool, ("type", "name", "description", "parameters", "strict", "defer_loading"), where,
                   ignored)
    _bool(tool, "strict", where=where + ".strict")  # the grammar holds every call to its schema
    return [function_tool(where, tool.get("name"), tool.get("description"), tool.get("parameters"))]


def responses_tools(body, ignored):
    """(tools, choice) of the request from the Responses API's tools and tool_choice."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array")
    clean = [t for i, tool in enumerate(tools or []) for t in _responses_tool("tools[%d]" % i, tool, ignored)]
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "allowed_tools":
            choice = choice.get("mode", "auto")
        elif kind in ("function", "custom"):
            choice = choice.get("name")
            if choice not in [t.name for t in clean]:
                raise InvalidRequest("'tool_choice.name' must name a function in 'tools'")
        else:  # a built-in tool, which does not run here: the model answers as it would
            choice = "auto"
    elif choice not in (None, "none", "auto", "required"):
        raise InvalidRequest("'tool_choice' must be none, auto, required or a named function")
    if not tools and choice not in (None, "none", "auto"):
        raise InvalidRequest("'tool_choice' needs 'tools'")
    # Only built-in tools, which do not run here: the model answers in text.
    return clean, tool_choice(choice, clean) if clean else "none"


def responses_format(body, ignored):
    """(format, schema, strict) of the request from `text.format`."""
    text = body.get("text")
    if text is None:
        return None, None, False
    if not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object")
    unknown_fields(text, ("format", "verbosity"), "text", ignored)
    fmt = text.get("format")
    if fmt is None:
        return None, None, False
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest("'text.format.type' must be text, json_object or json_schema")
    if fmt["type"] == "text":
        return None, None, False
    if fmt["type"] == "json_object":
        return "json", None, False
    strict = _bool(fmt, "strict", where="text.format.strict")
    kind, schema = format_schema(fmt.get("schema"), "text.format.schema", strict)
    return kind, schema, strict


def responses_reasoning(body, ignored):
    """(thinking, effort) of the Responses API's `reasoning`: `effort` honoured, `summary`
    accepted (no summaries are made: the reasoning items carry the thinking's own text)."""
    reasoning = body.get("reasoning")
    if reasoning is None:
        return None, None
    if not isinstance(reasoning, dict):
        raise InvalidRequest("'reasoning' must be an object")
    unknown_fields(reasoning, ("effort", "summary", "generate_summary"), "reasoning", ignored)
    if reasoning.get("summary") not in (None, "auto", "concise", "detailed"):
        raise InvalidRequest("'reasoning.summary' must be auto, concise or detailed")
    return reasoning_controls(reasoning.get("effort"), "reasoning.effort")


def validate_responses(body, n_ctx):
    """Check a Responses API body into a `ChatRequest`."""
    model = _model(body)
    ignored = []
    unknown_fields(body, RESPONSES_FIELDS, "", ignored)
    stateful = "no state is kept on this node: send the whole conversation as 'input'"
    refuse(body, "previous_response_id", lambda v: False, stateful)
    refuse(body, "conversation", lambda v: False, stateful)
    refuse(body, "prompt", lambda v: False, "stored prompts need state: send 'instructions'")
    refuse(body, "background", lambda v: v is False, "answers are given in the request")
    thinking, effort = responses_reasoning(body, ignored)
    refuse(body, "top_logprobs", lambda v: v == 0, "token log probabilities are not produced")
    messages = responses_messages(body, ignored)
    tools, choice = responses_tools(body, ignored)
    fmt, schema, strict = responses_format(body, ignored)
    _bool(body, "parallel_tool_calls", True)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise InvalidRequest("'stream_options' is only allowed with 'stream': true")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise InvalidRequest("'metadata' must be an object")
    key = body.get("prompt_cache_key")
    if key is not None and not isinstance(key, str):
        raise InvalidRequest("'prompt_cache_key' must be a string")
    return ChatRequest(model=model, messages=messages, format=fmt, format_schema=schema, strict_format=strict,
                       tools=tools, tool_choice=choice, stream=stream, include_usage=stream, cache_key=key,
                       max_tokens=_integer(body, "max_output_tokens", 1, 2 ** 31 - 1),
                       temperature=_number(body, "temperature", 0, 2), top_p=_number(body, "top_p", 0, 1),
                       thinking=thinking, effort=effort, ignored=ignored)


def response_head(rid, body, req, created):
    """The parts of a Response object that the answer does not change."""
    tools = [{"type": "custom", "name": t.name, "description": t.description} if t.kind == "custom" else
             {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
              "strict": True} for t in req.tools]
    fmt = ((body.get("text") or {}).get("format")) or {"type": "text"}
    return {"id": rid, "object": "response", "created_at": created, "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": req.model, "output": [], "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None, "store": False,  # nothing is kept
            "reasoning": {"effort": req.effort, "summary": None},
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "text": {"format": fmt}, "tool_choice": body.get("tool_choice", "auto"), "tools": tools,
            "truncation": "disabled", "user": body.get("user"), "metadata": body.get("metadata") or {},
            "usage": None}


def response_usage(usage):
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def response_finished(head, output, usage, finish):
    """The Response object of a finished answer: completed, or incomplete at the token limit."""
    done = dict(head, output=output, usage=response_usage(usage), status="completed")
    if finish == "length":
        done.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    return done


def _message_item(text, finish):
    return {"id": "msg_%s" % os.urandom(12).hex(), "type": "message", "role": "assistant",
            "status": "incomplete" if finish == "length" else "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call, tools):
    """A tool call as a function_call item (with its tool's namespace, if any), or a
    custom_tool_call item of a free-form tool."""
    tool = tools.get(call.name)
    if tool is not None and tool.kind == "custom":
        return {"id": "ctc_%s" % os.urandom(12).hex(), "type": "custom_tool_call", "status": "completed",
                "call_id": call.id, "name": call.name, "input": str(call.arguments.get("input", ""))}
    item = {"id": "fc_%s" % os.urandom(12).hex(), "type": "function_call", "status": "completed",
            "call_id": call.id, "name": call.name, "arguments": json.dumps(call.arguments)}
    if tool is not None and tool.namespace:
        item["namespace"] = tool.namespace
    return item


def tools_by_name(req):
    return {t.name: t for t in req.tools}


def _reasoning_item(text, status="completed"):
    """A reasoning model's thinking as a Responses `reasoning` item (no summary is made)."""
    return {"id": "rs_%s" % os.urandom(12).hex(), "type": "reasoning", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def response_output(message, finish, tools, reasoning=""):
    """An ended answer's thinking and message as Responses output items."""
    output = [_reasoning_item(reasoning)] if reasoning else []
    if not (message.tool_calls and not message.content):
        output.append(_message_item(message.content, finish))
    return output + [_call_item(c, tools) for c in message.tool_calls]


def _response_events(answer, head, tools):
    """An answer as the Responses event sequence, each with its sequence number."""
    seq = itertools.count()
    output, text, message, finish = [], "", None, "stop"

    def event(kind, **fields):
        return dict(fields, type=kind, sequence_number=next(seq))

    def open_message():
        item = dict(_message_item("", None), status="in_progress", content=[])
        yield event("response.output_item.added", output_index=len(output), item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", item_id=item["id"], output_index=len(output),
                    content_index=0, part=part)
        return item

    def close_message(item):
        item = dict(item, status="incomplete" if finish == "length" else "completed",
                    content=[{"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
        at = dict(item_id=item["id"], output_index=len(output))
        yield event("response.output_text.done", content_index=0, text=text, logprobs=[], **at)
        yield event("response.content_part.done", content_index=0, part=item["content"][0], **at)
        yield event("response.output_item.done", output_index=len(output), item=item)
        output.append(item)

    def close_reasoning(item, thought):
        item = dict(item, status="completed", content=[{"type": "reasoning_text", "text": thought}])
        at = dict(item_id=item["id"], output_index=len(output))
        yield event("response.reasoning_text.done", content_index=0, text=thought, **at)
        yield event("response.content_part.done", content_index=0, part=item["content"][0], **at)
        yield event("response.output_item.done", output_index=len(output), item=item)
        output.append(item)

    yield event("response.created", response=head)
    yield event("response.in_progress", response=head)
    thinking, thought = None, ""
    for ev in answer:
        if isinstance(ev, Piece) and ev.kind == "reasoning":
            if thinking is None:
                thinking = dict(_reasoning_item("", "in_progress"))
                yield event("response.output_item.added", output_index=len(output), item=thinking)
                yield event("response.content_part.added", item_id=thinking["id"], output_index=len(output),
                            content_index=0, part={"type": "reasoning_text", "text": ""})
            thought += ev.text
            yield event("response.reasoning_text.delta", item_id=thinking["id"], output_index=len(output),
                        content_index=0, delta=ev.text)
            continue
        if thinking is not None:
            yield from close_reasoning(thinking, thought)
            thinking = None
        piece = ev.text if isinstance(ev, Piece) else ev.message.content if answer.held else None
        calls = [] if isinstance(ev, Piece) else ev.message.tool_calls
        if not isinstance(ev, Piece):
            finish = ev.reason
        if piece or (message is None and not output and not calls and not isinstance(ev, Piece)):
            if message is None:
                message = yield from open_message()
            if piece:
                text += piece
                yield event("response.output_text.delta", item_id=message["id"], output_index=len(output),
                            content_index=0, delta=piece, logprobs=[])
        for call in calls:
            if message is not None:
                yield from close_message(message)
                message = None
            item = _call_item(call, tools)
            at = dict(item_id=item["id"], output_index=len(output))
            field_, kind = ("input", "custom_tool_call_input") if "input" in item else \
                ("arguments", "function_call_arguments")
            yield event("response.output_item.added", output_index=len(output),
                        item=dict(item, status="in_progress", **{field_: ""}))
            yield event("response.%s.delta" % kind, delta=item[field_], **at)
            yield event("response.%s.done" % kind, name=item["name"], **{field_: item[field_]}, **at)
            yield event("response.output_item.done", output_index=len(output), item=item)
            output.append(item)
    if message is not None:
        yield from close_message(message)
    done = response_finished(head, output, answer.usage, finish)
    yield event("response.completed" if done["status"] == "completed" else "response.incomplete",
                response=done)


# Errors as OpenAI's; an error after the stream started is the Responses `error` event.
RESPONSES = Dialect("responses", lambda err: err.body(), _sse_named, stream_error=lambda err: {
    "type": "error", "code": err.code, "message": err.message, "param": None})


@route("POST", "/v1/responses", RESPONSES)
def responses_create(node):
    body = read_json(node)
    req = validate_responses(body, node.settings.n_ctx)
    report_ignored(req.ignored)
    head = response_head("resp_%s" % os.urandom(12).hex(), body, req, int(time.time()))
    answer = node.chat(req)
    if not req.stream:
        ended = answer.collect()[0][0]
        return response_finished(head, response_output(ended.message, ended.reason, tools_by_name(req),
                                                       ended.reasoning), answer.usage, ended.reason)
    return stream(RESPONSES, _response_events(answer, head, tools_by_name(req)), answer)


###############################################################################
# Anthropic dialect ###########################################################
###############################################################################
# Anthropic's Messages API as a translation at the edge: content blocks become OpenAI-shaped chat
# messages and then the one internal request; the one result becomes content blocks, or
# Anthropic's event sequence. Errors are Anthropic's `{"type": "error", "error": {...}}`, with
# the same statuses as the other dialects.

# Fields that change nothing in the answer here: accepted and left alone (README's tables).
ANTHROPIC_ACCEPTED = ("metadata", "service_tier", "cache_control", "context_management", "inference_geo",
                      "container", "speed")


ANTHROPIC_FIELDS = ("model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p",
                    "top_k", "stream", "tools", "tool_choice", "output_config", "output_format",
                    "mcp_servers", "thinking") + ANTHROPIC_ACCEPTED


ANTHROPIC_COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "output_config",
                          "thinking", "mcp_servers", "cache_control", "context_management")


# Each error's neutral kind as Anthropic's error type; any other kind is an api_error.
ANTHROPIC_ERROR_TYPES = {"invalid_request": "invalid_request_error", "unauthorized": "authentication_error",
                         "not_found": "not_found_error", "too_large": "request_too_large",
                         "overloaded": "overloaded_error"}


_BLOCK_KEYS = {"text": ("type", "text", "cache_control", "citations"),
               "thinking": ("type", "thinking", "signature", "cache_control"),
               "redacted_thinking": ("type", "data", "cache_control"),
               "tool_use": ("type", "id", "name", "input", "cache_control", "caller"),
               "tool_result": ("type", "tool_use_id", "content", "is_error", "cache_control")}


# Blocks of earlier turns that need no rendering: the server tools' calls and results, which did
# not run on this node.
_SKIPPED_BLOCKS = ("server_tool_use", "web_search_tool_result",
                   "web_fetch_tool_result", "code_execution_tool_result", "bash_code_execution_tool_result",
                   "text_editor_code_execution_tool_result", "mcp_tool_use", "mcp_tool_result",
                   "tool_search_tool_result", "container_upload", "tool_reference")


def anthropic_error(err):
    """An error in Anthropic's shape."""
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(err.kind, "api_error"),
                                       "message": err.message}}


def _anthropic_blocks(where, content, role, ignored):
    """A message's content as checked blocks (a string is one text block); blocks that need no
    rendering are left out."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest("'%s' must be a string or an array of content blocks" % where)
    allowed = {"assistant": ("text", "tool_use", "thinking", "redacted_thinking"),
               "user": ("text", "tool_result"), "system": ("text",)}[role]
    blocks = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = "%s[%d]" % (where, j)
        if kind in ("image", "document", "search_result"):
            raise UnsupportedParameter("'%s.type' %s is not supported: this node reads text only"
                                       % (at, kind))
        if kind in _SKIPPED_BLOCKS:
            continue
        if kind not in allowed:
            raise InvalidRequest("'%s.type' must be one of %s in a %s message"
                                 % (at, ", ".join(allowed), role))
        unknown_fields(block, _BLOCK_KEYS[kind], at, ignored)
        if kind == "text" and not isinstance(block.get("text"), str):
            raise InvalidRequest("'%s.text' must be a string" % at)
        if kind == "thinking" and not (isinstance(block.get("thinking"), str)
                                       and isinstance(block.get("signature", ""), str)):
            raise InvalidRequest("'%s' needs a string 'thinking' and 'signature'" % at)
        if kind == "tool_use" and not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                                       and isinstance(block.get("input"), dict)):
            raise InvalidRequest("'%s' needs a string 'id' and 'name' and an object 'input'" % at)
        if kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidRequest("'%s.tool_use_id' must be a string" % at)
            _bool(block, "is_error", where=at + ".is_error")
            block = dict(block, text=_anthropic_text("%s.content" % at, block.get("content", ""), ignored))
        blocks.append(block)
    return blocks


def _anthropic_text(where, content, ignored):
    """The text of a string or of text blocks (a system prompt, a tool result's content); an
    image or document is refused by name, blocks that need no rendering left out."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("'%s' must be a string or an array of text blocks" % where)
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("image", "document", "search_result"):
            raise UnsupportedParameter("'%s[%d].type' %s is not supported: this node reads text only"
                                       % (where, j, kind))
        if kind in _SKIPPED_BLOCKS:
            continue
        if kind != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest("'%s' must be a string or an array of text blocks" % where)
        unknown_fields(block, _BLOCK_KEYS["text"], "%s[%d]" % (where, j), ignored)
        texts.append(block["text"])
    return "\n\n".join(texts)


def _breakpoint(content):
    """Where a content's `cache_control` breakpoint falls: "end" (its last block), "inside" (an
    earlier block: the prefix before this message is the one kept), or None."""
    if not isinstance(content, list):
        return None
    marked = [j for j, block in enumerate(content) if isinstance(block, dict) and block.get("cache_control")]
    if not marked:
        return None
    return "end" if marked[-1] == len(content) - 1 else "inside"


def anthropic_messages(body, ignored):
    """`system` and `messages` as `Message`s; a system message inside `messages` stays at its place.
    A `cache_control` breakpoint marks the message it ends (or, inside a message, the one before;
    on a tool, the system prompt, which the tools are rendered with; at the top level, the last
    message) for the prompt cache."""
    out = []
    if body.get("system") is not None:
        system = _anthropic_text("system", body["system"], ignored)
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        if system:
            out.append(Message("system", system, cache_mark=bool(
                _breakpoint(body["system"]) or any(isinstance(t, dict) and t.get("cache_control")
                                                   for t in tools))))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise InvalidRequest("'messages[%d].role' must be user, assistant or system" % i)
        unknown_fields(m, ("role", "content"), "messages[%d]" % i, ignored)
        blocks = _anthropic_blocks("messages[%d].content" % i, m.get("content"), m["role"], ignored)
        text = "".join(b["text"] for b in blocks if b["type"] == "text")
        where, start = _breakpoint(m.get("content")), len(out)
        if where == "inside" and out:
            out[-1].cache_mark = True
        if m["role"] == "system":
            out.append(Message("system", text))
        elif m["role"] == "assistant":
            # The node's own thinking comes back to the model; another's (or redacted) is left out.
            thought = "".join(b["thinking"] for b in blocks if b["type"] == "thinking"
                              and hmac.compare_digest(thinking_signature(b["thinking"]).encode(),
                                                      b.get("signature", "").encode("utf-8")))
            out.append(Message("assistant", text, [ToolCall(b["id"], b["name"], b["input"])
                                                   for b in blocks if b["type"] == "tool_use"],
                               reasoning=thought))
        else:
            for b in blocks:  # results answer the calls of the turn before: they come first
                if b["type"] == "tool_result":
                    out.append(Message("tool", ("Error: " if b.get("is_error") else "") + b["text"],
                                       tool_call_id=b["tool_use_id"]))
            if text or not any(b["type"] == "tool_result" for b in blocks):
                out.append(Message("user", text))
        if where == "end" and len(out) > start:
            out[-1].cache_mark = True
    if body.get("cache_control") and out:  # automatic caching: the breakpoint on the last block
        out[-1].cache_mark = True
    return out


def anthropic_tools(body, ignored):
    """(tools, choice) of the request from Anthropic's tools and tool_choice; server tools (typed,
    run by Anthropic's API) are not offered: none runs here."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array")
    clean = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise InvalidRequest("'tools[%d]' must be an object" % i)
        if tool.get("type") not in (None, "custom"):
            continue
        unknown_fields(tool, ("type", "name", "description", "input_schema", "cache_control", "strict",
                              "defer_loading", "input_examples", "allowed_callers", "eager_input_streaming"),
                       "tools[%d]" % i, ignored)
        if not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequest("'tools[%d].input_schema' must be a JSON schema object" % i)
        _bool(tool, "strict", where="tools[%d].strict" % i)  # the grammar holds every call to its schema
        clean.append(function_tool("tools[%d]" % i, tool.get("name"), tool.get("description"),
                                   tool["input_schema"]))
    if choice is None:
        return clean, "auto" if clean else "none"
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest("'tool_choice.type' must be auto, any, tool or none")
    unknown_fields(choice, ("type", "name", "disable_parallel_tool_use"), "tool_choice", ignored)
    _bool(choice, "disable_parallel_tool_use", where="tool_choice.disable_parallel_tool_use")
    if kind == "tool" and choice.get("name") not in [t.name for t in clean]:
        raise InvalidRequest("'tool_choice.name' must name a tool in 'tools'")
    if kind != "none" and not tools:
        raise InvalidRequest("'tool_choice' needs 'tools'")
    if kind != "none" and not clean:
        return clean, "none"  # only server tools, which do not run here: the model answers in text
    return clean, {"auto": "auto", "any": "required", "none": "none"}.get(kind, choice.get("name"))


def thinking_signature(text):
    """The `signature` of a thinking block the node wrote: a fixed, documented scheme (HMAC-SHA256
    of the text under the key "llmnode thinking v1", base64), by which the node knows its own
    thinking when a client sends it back. It proves no secret: any block may carry it."""
    digest = hmac.new(b"llmnode thinking v1", text.encode("utf-8"), hashlib.sha256).digest()
    return "llmnode1." + base64.b64encode(digest).decode("ascii")


def anthropic_thinking(body):
    """(thinking: True/False/None, budget or None) of Anthropic's `thinking`: enabled (with
    `budget_tokens`), disabled, or adaptive (the model's own)."""
    thinking = body.get("thinking")
    if thinking is None:
        return None, None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise InvalidRequest("'thinking.type' must be enabled, disabled or adaptive")
    if kind == "disabled":
        return False, None
    budget = _integer(thinking, "budget_tokens", 0, 2 ** 31 - 1, "thinking.budget_tokens")
    return True, budget if kind == "enabled" else None


def validate_anthropic(body, n_ctx, fields=ANTHROPIC_FIELDS):
    """Check a Messages API body into a `ChatRequest`."""
    model = _model(body)
    ignored = []
    unknown_fields(body, fields, "", ignored)
    thinking, budget = anthropic_thinking(body)
    refuse(body, "mcp_servers", lambda v: v == [], "MCP servers are not called from this node")
    messages = anthropic_messages(body, ignored)
    tools, choice = anthropic_tools(body, ignored)
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) and s for s in stop)):
        raise InvalidRequest("'stop_sequences' must be an array of up to 16 non-empty strings")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise InvalidRequest("'metadata' must be an object")
    if fields is ANTHROPIC_FIELDS and body.get("max_tokens") is None:
        raise InvalidRequest("'max_tokens' is required")
    stream = _bool(body, "stream")
    fmt, schema = anthropic_format(body, ignored)
    off, effort = reasoning_controls((body.get("output_config") or {}).get("effort"), "output_config.effort")
    return ChatRequest(model=model, messages=messages, tools=tools, tool_choice=choice, stop=stop or None,
                       format=fmt, format_schema=schema, stream=stream, include_usage=stream,
                       thinking=False if off is False else thinking, effort=effort, budget=budget,
                       max_tokens=_integer(body, "max_tokens", 1, 2 ** 31 - 1),
                       temperature=_number(body, "temperature", 0, 1), top_p=_number(body, "top_p", 0, 1),
                       top_k=_integer(body, "top_k", 0, 2 ** 31 - 1), ignored=ignored)


def anthropic_format(body, ignored):
    """(format, schema) of the request from `output_config.format` (or the beta's `output_format`)."""
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise InvalidRequest("'output_config' must be an object")
    unknown_fields(config or {}, ("format", "effort"), "output_config", ignored)
    fmt = (config or {}).get("format") or body.get("output_format")
    if fmt is None:
        return None, None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" \
            or not isinstance(fmt.get("schema"), dict):
        raise InvalidRequest("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}")
    return format_schema(fmt["schema"], "output_config.format.schema")


def anthropic_stop(ended):
    """(stop_reason, stop_sequence) of an ended answer."""
    if ended.reason == "length":
        return "max_tokens", None
    if ended.reason == "tool_calls":
        return "tool_use", None
    if ended.stop_sequence:
        return "stop_sequence", ended.stop_sequence
    return "end_turn", None


def anthropic_usage(usage):
    """Anthropic's usage: input_tokens are those not read from the prompt cache."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "output_tokens": usage.completion_tokens, "cache_read_input_tokens": usage.cached_tokens,
            "cache_creation_input_tokens": 0}


def _tool_use(call):
    return {"type": "tool_use", "id": "toolu_" + call.id.split("_", 1)[-1], "name": call.name,
            "input": call.arguments}


def anthropic_message(answer, model):
    """A finished answer as an Anthropic message."""
    ended = answer.collect()[0][0]
    calls, text = ended.message.tool_calls, ended.message.content
    content = ([{"type": "text", "text": text}] if text or not calls else []) + [_tool_use(c) for c in calls]
    if ended.reasoning:
        content.insert(0, {"type": "thinking", "thinking": ended.reasoning,
                           "signature": thinking_signature(ended.reasoning)})
    reason, sequence = anthropic_stop(ended)
    return {"id": "msg_%s" % os.urandom(12).hex(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": anthropic_usage(answer.usage)}


def _anthropic_events(answer, model):
    """An answer as Anthropic's event sequence."""
    yield {"type": "message_start", "message": {
        "id": "msg_%s" % os.urandom(12).hex(), "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": anthropic_usage(Usage())}}
    yield {"type": "ping"}
    index, text_open, stop, thought = 0, False, ("end_turn", None), None
    for ev in answer:
        if isinstance(ev, Piece) and ev.kind == "reasoning":
            if thought is None:
                thought = []
                yield {"type": "content_block_start", "index": index,
                       "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
            thought.append(ev.text)
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "thinking_delta", "thinking": ev.text}}
            continue
        if thought is not None:  # the thinking has ended: signed, closed
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "signature_delta", "signature": thinking_signature("".join(thought))}}
            yield {"type": "content_block_stop", "index": index}
            index, thought = index + 1, None
        text = ev.text if isinstance(ev, Piece) else ev.message.content if answer.held else None
        if text:
            if not text_open:
                yield {"type": "content_block_start", "index": index,
                       "content_block": {"type": "text", "text": ""}}
                text_open = True
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "text_delta", "text": text}}
        if isinstance(ev, Piece):
            continue
        for call in ev.message.tool_calls:
            if text_open:
                yield {"type": "content_block_stop", "index": index}
                index, text_open = index + 1, False
            block = _tool_use(call)
            yield {"type": "content_block_start", "index": index, "content_block": dict(block, input={})}
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}
            yield {"type": "content_block_stop", "index": index}
            index += 1
        stop = anthropic_stop(ev)
    if text_open:
        yield {"type": "content_block_stop", "index": index}
    yield {"type": "message_delta", "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]},
           "usage": anthropic_usage(answer.usage)}
    yield {"type": "message_stop"}


def count_prompt_tokens(node, req):
    """The prompt's tokens as the model's template renders it, tools included: rendered as the
    engine renders it for an answer."""
    req = with_system(req, node.modelfile(req.model)[0])
    entry = node.load(req.model)
    try:
        return len(node.chat_prompt(entry, req)[0])  # the very prompt a generation would read
    finally:
        entry.release()


# Errors `{"type": "error", "error": {...}}`; streams of named events, an error the `error` event.
ANTHROPIC = Dialect("anthropic", anthropic_error, _sse_named)
DIALECT_PREFIXES["/v1/messages"] = ANTHROPIC


@route("POST", "/v1/messages", ANTHROPIC)
def anthropic_create(node):
    req = validate_anthropic(read_json(node), node.settings.n_ctx)
    report_ignored(req.ignored)
    answer = node.chat(req)
    if not req.stream:
        return anthropic_message(answer, req.model)
    return stream(ANTHROPIC, _anthropic_events(answer, req.model), answer)


@route("POST", "/v1/messages/count_tokens", ANTHROPIC)
def anthropic_count_tokens(node):
    req = validate_anthropic(read_json(node), node.settings.n_ctx, ANTHROPIC_COUNT_FIELDS)
    report_ignored(req.ignored)
    return {"input_tokens": count_prompt_tokens(node, req)}


###############################################################################
# Ollama dialect ##############################################################
###############################################################################
# A translation at the edge, as Ollama's own OpenAI middleware is the other way round: each route
# checks Ollama's body into the internal request (errors naming Ollama's fields: `options.*`,
# `format`, `messages[i]`), runs the same Node call (guard, repair, pool, engine), and renders
# the answer as Ollama's objects. Errors are Ollama's `{"error": "..."}` with the same statuses.

OLLAMA_VERSION = "0.12.0"  # the Ollama API level these routes follow


# Ollama's documented options that change nothing in the answer here (speed, memory, or samplers
# llama.cpp's server no longer runs): accepted and left alone (README's tables).
OLLAMA_ACCEPTED_OPTIONS = ("numa", "num_batch", "main_gpu", "low_vram", "num_thread", "use_mmap",
                           "use_mlock", "vocab_only", "f16_kv", "logits_all", "embedding_only", "num_keep",
                           "typical_p", "repeat_last_n", "penalize_newline", "tfs_z", "mirostat",
                           "mirostat_tau", "mirostat_eta", "rope_frequency_base", "rope_frequency_scale")


OLLAMA_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty",
                  "presence_penalty", "frequency_penalty", "num_predict", "num_ctx",
                  "num_gpu") + OLLAMA_ACCEPTED_OPTIONS


OLLAMA_CHAT_FIELDS = ("model", "messages", "tools", "format", "options", "stream", "keep_alive", "think")


OLLAMA_GENERATE_FIELDS = ("model", "prompt", "suffix", "system", "template", "context", "stream", "raw",
                          "format", "options", "keep_alive", "images", "think")


FOREVER = "9999-12-31T23:59:59Z"


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


def ollama_keep_alive(body):
    if "keep_alive" not in body or body["keep_alive"] is None:
        return KEEP_DEFAULT
    try:
        return conf.parse_keep_alive(body["keep_alive"])
    except ValueError:
        raise InvalidRequest("'keep_alive' must be a duration such as 5m, 30s, -1 or 0") from None


def ollama_options(body, n_ctx, ignored):
    """Ollama's `options`, checked into the request's sampling fields (errors name
    `options.<key>`); the model's params layer under them is applied by the Node."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be an object")
    unknown_fields(options, OLLAMA_OPTIONS, "options", ignored)
    at = {key: "options." + key for key in options}
    fields = {"temperature": _number(options, "temperature", 0, 2, at.get("temperature")),
              "top_p": _number(options, "top_p", 0, 1, at.get("top_p")),
              "top_k": _integer(options, "top_k", 0, 2 ** 31 - 1, at.get("top_k")),
              "min_p": _number(options, "min_p", 0, 1, at.get("min_p")),
              "seed": _integer(options, "seed", -(2 ** 63), 2 ** 64 - 1, at.get("seed")),
              "stop": _stop(options, "options.stop", most=64),
              "repeat_penalty": _number(options, "repeat_penalty", 0, 100, at.get("repeat_penalty")),
              "presence_penalty": _number(options, "presence_penalty", -2, 2, at.get("presence_penalty")),
              "frequency_penalty": _number(options, "frequency_penalty", -2, 2, at.get("frequency_penalty"))}
    predict = options.get("num_predict")
    if predict is not None and (isinstance(predict, bool) or not isinstance(predict, int)):
        raise InvalidRequest("'options.num_predict' must be an integer")
    # -1 and -2: until the context ends, Ollama's default (0 too: the params layer's, else that).
    fields["max_tokens"] = _integer(options, "num_predict", 1, n_ctx, "options.num_predict") \
        if predict is not None and predict > 0 else (0 if predict is not None else None)
    ctx = options.get("num_ctx")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or not 1 <= ctx <= n_ctx):
        raise UnsupportedParameter("'options.num_ctx' above the node's context (%d, LLM_CTX_SIZE) "
                                   "is not supported" % n_ctx)
    fields["ctx_limit"] = ctx
    fields["gpu_layers"] = _integer(options, "num_gpu", -1, 1 << 16, at.get("num_gpu"))
    return fields


def ollama_format(body):
    """(format, schema) of the internal request from Ollama's `format`."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return None, None
    if fmt == "json":
        return "json", None
    if isinstance(fmt, dict):
        return format_schema(fmt, "format")
    raise InvalidRequest("'format' must be \"json\" or a JSON schema object")


def ollama_messages(messages, ignored):
    """Ollama's messages as `Message`s (tool calls' arguments are objects, as here)."""
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest("'messages[%d].role' must be one of system, user, assistant, tool" % i)
        unknown_fields(m, ("role", "content", "images", "thinking", "tool_calls", "tool_name",
                           "tool_call_id"), "messages[%d]" % i, ignored)
        if m.get("images"):
            raise UnsupportedParameter("'messages[%d].images' is not supported: no vision models" % i)
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise InvalidRequest("'messages[%d].content' must be a string" % i)
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments", {}), dict) for c in calls):
            raise InvalidRequest("'messages[%d].tool_calls' must be an array of function calls" % i)
        thought = m.get("thinking") or ""
        if not isinstance(thought, str):
            raise InvalidRequest("'messages[%d].thinking' must be a string" % i)
        message = Message(m["role"], content, reasoning=thought if m["role"] == "assistant" else "",
                          tool_calls=[
            ToolCall(c.get("id") or "call_%d_%d" % (i, k), c["function"]["name"],
                     c["function"].get("arguments", {})) for k, c in enumerate(calls)])
        if m["role"] == "tool":
            message.tool_call_id = m.get("tool_call_id") or m.get("tool_name") or "call"
            message.name = m.get("tool_name")
        out.append(message)
    return out


def ollama_final(model, answer, started, done_reason, **extra):
    """Ollama's last object: prompt_eval_count counts the prompt tokens evaluated, not those
    the prompt cache held."""
    total, timings, usage = time.monotonic() - started, answer.timings, answer.usage
    return dict({"model": model, "created_at": rfc3339(time.time()), "done": True,
                 "done_reason": done_reason, "total_duration": int(total * 1e9),
                 "load_duration": int(timings.get("load", 0) * 1e9),
                 "prompt_eval_count": usage.prompt_tokens - usage.cached_tokens,
                 "prompt_eval_duration": int(timings.get("prompt_eval", 0) * 1e9),
                 "eval_count": usage.completion_tokens,
                 "eval_duration": int(timings.get("eval", 0) * 1e9)}, **extra)


# Errors `{"error": "..."}`; streams of NDJSON lines, an error after the 200 its own line (which
# the ollama client raises).
OLLAMA = Dialect("ollama", lambda err: {"error": err.message}, lambda event: json.dumps(event) + "\n",
                 stream_type="application/x-ndjson")
DIALECT_PREFIXES["/api/"] = OLLAMA


def ollama_body(node, fields, ignored):
    """The request's JSON object; `name` taken as `model` (older clients); fields no API has noted."""
    body = read_json(node)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    if "model" not in body and isinstance(body.get("name"), str):
        body["model"] = body.pop("name")  # older clients
    unknown_fields(body, fields, "", ignored)
    return body


def ollama_stream(body):
    return _bool(body, "stream", True)


def ollama_load_only(node, body, key):
    """A request with no prompt loads the model (or, with keep_alive 0, unloads it)."""
    keep = ollama_keep_alive(body)
    model = _model(body)
    entry = node.load(model, keep)
    path = entry.path
    entry.release()
    reason = "load"
    if keep == 0:
        node.pool.drop(path)
        reason = "unload"
    event = {"model": model, "created_at": rfc3339(time.time()), "done": True,
             "done_reason": reason}
    event[key] = {"role": "assistant", "content": ""} if key == "message" else ""
    return event


def ollama_request(node, body, messages, ignored, raw_prompt=None):
    """The request of an Ollama chat or generate body; errors name Ollama's fields."""
    model = _model(body)
    fields = ollama_options(body, node.settings.n_ctx, ignored)
    fmt, schema = ollama_format(body)
    stream_ = ollama_stream(body)
    fields.update(model=model, stream=stream_, include_usage=stream_, format=fmt, format_schema=schema,
                  keep_alive=ollama_keep_alive(body), ignored=ignored)
    if raw_prompt is not None:
        return CompletionRequest(prompts=[raw_prompt], **fields)
    # The ollama client sends [] for no tools.
    tools, choice = function_tools({"tools": body.get("tools") or None}, ignored)
    return ChatRequest(messages=messages, tools=tools, tool_choice=choice, **ollama_think(body),
                       **fields)


def ollama_think(body):
    """Ollama's `think`: true/false, or an effort (low, medium, high)."""
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return {"thinking": think}
    if think not in EFFORTS:
        raise InvalidRequest("'think' must be true, false, or one of low, medium, high")
    return {"thinking": True, "effort": think}


def ollama_generation(node, body, messages, key, ignored, raw_prompt=None):
    """A chat or generate answer, as one object or NDJSON lines."""
    started = time.monotonic()
    req = ollama_request(node, body, messages, ignored, raw_prompt)
    report_ignored(req.ignored)
    answer = node.complete(req) if raw_prompt is not None else node.chat(req)
    if req.stream:
        return stream(OLLAMA, _ollama_chunks(answer, req.model, key, started), answer)
    ended = answer.collect()[0][0]
    said = ollama_message(ended.message) if key == "message" else ended.message.content
    extra = {}
    if ended.reasoning and key == "message":
        said["thinking"] = ended.reasoning
    elif ended.reasoning:
        extra["thinking"] = ended.reasoning
    return ollama_final(req.model, answer, started, ollama_reason(ended), **{key: said}, **extra)


def ollama_reason(ended):
    """Ollama's done_reason: a tool call is a `stop`."""
    return "stop" if ended.reason == "tool_calls" else ended.reason


def ollama_message(message):
    """An answer's `Message` as Ollama's: tool calls' arguments as objects, no ids."""
    out = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}}
                             for c in message.tool_calls]
    return out


# llama.cpp's LLAMA_FTYPE values, as Ollama names quantization levels.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
              17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
              23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
              29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16"}


def human_number(n):
    """Ollama's parameter_size format: 8B, 7.6B, 134.52M, 500K."""
    for size, unit, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if n >= size:
            value = n / size
            return ("%d%s" % (value, unit)) if value == int(value) else ("%.*f%s" % (digits, value, unit))
    return str(n)


def ollama_describe(node, ref, check_weights=True):
    """What Ollama's API says of a model: (manifest, weights layer, GGUF metadata, details,
    kind -> text of its template/system/params/license layers). Every layer is checked
    (and repaired) before it is read: the texts against their digests, the weights by the
    guard (a full check if they changed since the last one). With `check_weights` false,
    the metadata of weights that changed since their last check is left out, not read."""
    manifest = node.repairs.manifest(ref)
    layer = model_layer(manifest)
    extras = node.repairs.layer_texts(ref, manifest)
    meta, params = {}, 0
    if check_weights:
        node.repairs.ensure(ref, on_change=node.pool.drop)
    if check_weights or node.guard.unchanged(layer):
        meta, params = node.metadata.read(layer["digest"], node.store.blob_path(layer["digest"]))
    arch = meta.get("general.architecture", "")
    details = {"parent_model": "", "format": "gguf", "family": arch,
               "families": [arch] if arch else None,
               "parameter_size": (human_number(params) if params
                                  else meta.get("general.size_label", "")),
               "quantization_level": FILE_TYPES.get(meta.get("general.file_type", 0), "unknown")}
    meta = dict(meta, **{"general.parameter_count": params})
    return manifest, layer, meta, details, extras


@route("GET", "/api/version", OLLAMA)
def ollama_version(node):
    return {"version": OLLAMA_VERSION}


@route("GET", "/api/tags", OLLAMA)
def ollama_tags(node):
    models = []
    for ref in node.store.models():
        try:
            # A listing hashes nothing large: details come from weights as last checked.
            manifest, layer, _meta, details, _extras = ollama_describe(node, ref, check_weights=False)
            raw = node.store.read_manifest_raw(ref)
        except LLMNodeError:
            continue
        mtime = os.stat(node.store.manifest_path(ref)).st_mtime
        size = sum(la.get("size", 0) for la in manifest["layers"])
        models.append({"name": str(ref), "model": str(ref), "modified_at": rfc3339(mtime),
                       "size": size, "digest": hashlib.sha256(raw).hexdigest(),
                       "details": details})
    return {"models": models}


@route("POST", "/api/show", OLLAMA)
def ollama_show(node):
    ignored = []
    body = ollama_body(node, ("model", "verbose", "system", "template", "options"), ignored)
    report_ignored(ignored)
    ref = names.parse(_model(body))
    manifest, layer, meta, details, extras = ollama_describe(node, ref)
    params = params_layer(extras)
    parameters = "\n".join("%-30s %s" % (k, json.dumps(x) if isinstance(x, str) else x)
                           for k, v in params.items() for x in (v if isinstance(v, list) else [v]))
    template = extras.get("template") or meta.get("tokenizer.chat_template", "")
    modelfile = "# Modelfile generated by llmnode\nFROM %s\n" % node.store.blob_path(layer["digest"])
    if extras.get("template"):
        modelfile += 'TEMPLATE """%s"""\n' % extras["template"]
    if extras.get("system"):
        modelfile += 'SYSTEM """%s"""\n' % extras["system"]
    modelfile += "".join("PARAMETER %s\n" % line for line in parameters.splitlines())
    answer = {"modelfile": modelfile, "parameters": parameters, "template": template,
              "details": details, "model_info": meta, "capabilities": ["completion", "tools"] + (
                  ["thinking"] if reasoning_format(meta.get("tokenizer.chat_template")) else []),
              "modified_at": rfc3339(os.stat(node.store.manifest_path(ref)).st_mtime)}
    if extras.get("license") or meta.get("general.license"):
        answer["license"] = extras.get("license") or meta["general.license"]
    if extras.get("system"):
        answer["system"] = extras["system"]
    return answer


@route("GET", "/api/ps", OLLAMA)
def ollama_ps(node):
    by_digest = {}
    for ref in node.store.models():
        try:
            layer = model_layer(node.store.read_manifest(ref))
        except LLMNodeError:
            continue
        by_digest.setdefault(node.store.blob_path(layer["digest"]), []).append(ref)
    models = []
    for path, size, _loaded_at, expires in node.pool.running():
        for ref in by_digest.get(path, []):
            _m, _l, _meta, details, _e = ollama_describe(node, ref, check_weights=False)
            raw = node.store.read_manifest_raw(ref)
            models.append({"name": str(ref), "model": str(ref), "size": size, "size_vram": 0,
                           "digest": hashlib.sha256(raw).hexdigest(), "details": details,
                           "expires_at": FOREVER if expires is None else rfc3339(expires),
                           "context_length": node.settings.n_ctx})
    return {"models": models}


@route("POST", "/api/chat", OLLAMA)
def ollama_chat(node):
    ignored = []
    body = ollama_body(node, OLLAMA_CHAT_FIELDS, ignored)
    messages = ollama_messages(body.get("messages") or [], ignored)
    if not messages:
        report_ignored(ignored)
        return ollama_load_only(node, body, "message")
    return ollama_generation(node, body, messages, "message", ignored)


@route("POST", "/api/generate", OLLAMA)
def ollama_generate(node):
    ignored = []
    body = ollama_body(node, OLLAMA_GENERATE_FIELDS, ignored)
    refuse(body, "images", lambda v: not v, "no vision models")
    refuse(body, "suffix", lambda v: v == "", "this node does not do fill-in-the-middle")
    refuse(body, "context", lambda v: not v, "pass the conversation as /api/chat messages")
    refuse(body, "template", lambda v: v == "", "the model's own chat template (from its GGUF) "
           "is used; Go templates are not rendered")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string")
    if not prompt:
        report_ignored(ignored)
        return ollama_load_only(node, body, "response")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRequest("'system' must be a string")
    if _bool(body, "raw"):
        return ollama_generation(node, body, None, "response", ignored, raw_prompt=prompt)
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    return ollama_generation(node, body, messages, "response", ignored)


OLLAMA_EMBED_FIELDS = ("model", "input", "truncate", "options", "keep_alive", "dimensions")


def ollama_embed_request(node, body, field, ignored):
    """The internal embedding request of an Ollama body, its inputs under `field`; errors name
    Ollama's fields. `truncate` (default true) cuts an input to what the model reads, as
    Ollama does; `options.num_ctx` shortens that further."""
    model = _model(body)
    value = body.get(field)
    inputs = [value] if isinstance(value, str) else value if field == "input" else None
    if not isinstance(inputs, list) or not inputs or len(inputs) > 2048 or not all(
            isinstance(v, str) for v in inputs):
        raise InvalidRequest("'%s' must be a string%s" % (field, " or an array of strings"
                                                           if field == "input" else ""))
    if not all(inputs):
        raise InvalidRequest("'%s' must not hold empty strings" % field)
    options = body.get("options")
    ctx = None
    if isinstance(options, dict) and "num_ctx" in options:
        options = dict(options)
        ctx = _integer(options, "num_ctx", 1, 1 << 31, "options.num_ctx")
        del options["num_ctx"]
    checked = ollama_options(dict(body, options=options), node.settings.n_ctx, ignored)
    report_ignored(ignored)
    return {"model": model, "inputs": inputs, "field": field, "keep_alive": ollama_keep_alive(body),
            "truncate": _bool(body, "truncate", True) if field == "input" else False,
            "dimensions": _integer(body, "dimensions", 1, 1 << 16), "ctx_limit": ctx,
            "gpu_layers": checked["gpu_layers"]}


@route("POST", "/api/embed", OLLAMA)
def ollama_embed(node):
    ignored = []
    body = ollama_body(node, OLLAMA_EMBED_FIELDS, ignored)
    req = ollama_embed_request(node, body, "input", ignored)
    started = time.monotonic()
    vectors, used = node.embed(req)
    return {"model": body["model"], "embeddings": vectors,
            "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": used}


@route("POST", "/api/embeddings", OLLAMA)
def ollama_embeddings(node):
    """Ollama's older route: one `prompt`, refused (not cut) when longer than the model reads."""
    ignored = []
    body = ollama_body(node, ("model", "prompt", "options", "keep_alive"), ignored)
    vectors, _used = node.embed(ollama_embed_request(node, body, "prompt", ignored))
    return {"embedding": vectors[0]}


@route("POST", "/api/pull", OLLAMA)
def ollama_pull(node):
    ignored = []
    body = ollama_body(node, ("model", "insecure", "stream"), ignored)
    report_ignored(ignored)
    ref = names.parse(_model(body))
    refuse(body, "insecure", lambda v: v is False, "plain-http registries are set with "
           "LLM_INSECURE_REGISTRIES")
    events = queue.Queue()
    call = in_thread(lambda: operations.pull(node.repairs, ref, report=events.put), "api-pull")
    if not ollama_stream(body):
        outcome(call, node.settings.repair_timeout_secs * 4)
        return {"status": "success"}
    return stream(OLLAMA, _pull_events(node, call, events))


@route("DELETE", "/api/delete", OLLAMA)
def ollama_delete(node):
    ignored = []
    body = ollama_body(node, ("model",), ignored)
    report_ignored(ignored)
    ref = names.parse(_model(body))
    for digest in operations.delete(node.repairs, ref):
        node.pool.drop(node.store.blob_path(digest))
    return {}


@route("POST", "/api/copy", OLLAMA)
def ollama_copy(node):
    ignored = []
    body = ollama_body(node, ("source", "destination"), ignored)
    report_ignored(ignored)
    for key in ("source", "destination"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise InvalidRequest("'%s' is required and must be a model name" % key)
    operations.copy(node.repairs, names.parse(body["source"]), names.parse(body["destination"]))
    return {}


def _ollama_chunks(answer, model, key, started):
    """An answer as Ollama's NDJSON objects, ending in the final one."""
    reason = "stop"
    for ev in answer:
        if isinstance(ev, Piece) and ev.kind == "reasoning":
            if key == "message":
                said = {key: {"role": "assistant", "content": "", "thinking": ev.text}}
            else:
                said = {key: "", "thinking": ev.text}
            yield dict({"model": model, "created_at": rfc3339(time.time()), "done": False}, **said)
            continue
        if isinstance(ev, Piece):
            if ev.text:
                part = {"role": "assistant", "content": ev.text} if key == "message" else ev.text
                yield {"model": model, "created_at": rfc3339(time.time()), key: part, "done": False}
            continue
        reason = ollama_reason(ev)
        if answer.held and (ev.message.content or ev.message.tool_calls):
            yield {"model": model, "created_at": rfc3339(time.time()), key: ollama_message(ev.message),
                   "done": False}
    last = {"role": "assistant", "content": ""} if key == "message" else ""
    yield ollama_final(model, answer, started, reason, **{key: last})


def ollama_pull_status(event):
    """A pull's step in Ollama's words."""
    if event.step == "blob":
        return {"status": "pulling %s" % event.digest[7:19], "digest": event.digest,
                "total": event.total, "completed": event.completed}
    return {"status": {"manifest": "pulling manifest", "verify": "verifying sha256 digest",
                       "write": "writing manifest", "done": "success"}[event.step]}


def _pull_events(node, call, events):
    """The pull's steps as they happen, in Ollama's words, with byte progress of the blob
    being fetched; a pull that outlives the non-streamed pull's deadline ends the stream with
    the repair timeout (the pull itself goes on, as a repair does)."""
    current = None
    deadline = time.monotonic() + node.settings.repair_timeout_secs * 4
    while True:
        try:
            event = events.get(timeout=0.25)
        except queue.Empty:
            if call.done():
                call.result()  # raises the pull's error, if any
                return
            if time.monotonic() > deadline:
                raise RepairTimeout() from None
            if current is not None:
                done = node.repairs.progress_of(current.digest)
                if done is not None:
                    yield ollama_pull_status(dataclasses.replace(current, completed=done))
            continue
        current = event if event.step == "blob" else None
        yield ollama_pull_status(event)
        if event.step == "done":
            return


###############################################################################
# Retrieval ###################################################################
###############################################################################
# Rerank in llama.cpp's server's shape (Jina's and Cohere's), and llama.cpp's server's tokenize,
# detokenize and apply-template, each on the model the body names, through the same guard,
# repair and pool as generation. Errors are OpenAI's shape.

RERANK_FIELDS = ("model", "query", "documents", "top_n", "return_documents", "rank_fields")
TOKENIZE_FIELDS = ("model", "content", "add_special", "parse_special", "with_pieces")


def validate_rerank(req):
    """Check a rerank body: the query, the documents' texts, top_n and return_documents."""
    model = _model(req)
    report_ignored(unknown_fields(req, RERANK_FIELDS, "", []))
    refuse(req, "rank_fields", lambda v: False, "documents are ranked as text (strings or {\"text\": ...})")
    query = req.get("query")
    if not isinstance(query, str) or not query:
        raise InvalidRequest("'query' is required and must be a non-empty string")
    documents = req.get("documents")
    if not isinstance(documents, list) or not documents or len(documents) > 1024:
        raise InvalidRequest("'documents' must be an array of 1 to 1024 strings or {\"text\": ...} objects")
    texts = []
    for i, d in enumerate(documents):
        text = d.get("text") if isinstance(d, dict) else d
        if not isinstance(text, str) or not text:
            raise InvalidRequest("'documents[%d]' must be a non-empty string or {\"text\": \"...\"}" % i)
        texts.append(text)
    top_n = _integer(req, "top_n", 1, 1 << 31)
    return {"model": model, "query": query, "documents": texts, "top_n": top_n or len(texts),
            "return_documents": _bool(req, "return_documents")}


def rank(node, req):
    """(score of each document, tokens read) on the reranker `req` names; a model without rank
    pooling is refused by name."""
    entry = node.load(req["model"])
    try:
        llm, cap = entry.llm, node.settings.embed_ctx_size
        if not rank_pooled(llm):
            raise InvalidRequest("model %s cannot rank: its GGUF names no rank pooling (a reranker "
                                 "such as bge-reranker or Qwen3-Reranker does)" % req["model"])
        limit = embed_limit(llm, cap)
        scores, used = [], 0
        for i, document in enumerate(req["documents"]):
            tokens = fit_input(llm, rerank_tokens(llm, req["query"], document), "documents[%d]" % i,
                               limit, truncate=False)
            scores.append(rank_score(llm, tokens, cap, node.settings.n_threads, node.compute.run))
            used += len(tokens)
    finally:
        entry.release()
    node.metrics.inc("llmnode_embedded_tokens_total", used)
    return scores, used


@route("POST", "/v1/rerank")
@route("POST", "/rerank")
def rerank(node):
    req = validate_rerank(read_json(node))
    scores, used = rank(node, req)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:req["top_n"]]
    results = [{"index": i, "relevance_score": scores[i]} for i in order]
    if req["return_documents"]:
        for r in results:
            r["document"] = {"text": req["documents"][r["index"]]}
    return {"model": req["model"], "object": "list", "results": results,
            "usage": {"prompt_tokens": used, "total_tokens": used}}


def _token_ids(llm, value, where):
    vocab = llm.n_vocab()
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in value):
        raise InvalidRequest("'%s' must be an array of token ids of the model's vocabulary (0-%d)"
                             % (where, vocab - 1))
    return value


@route("POST", "/tokenize")
def tokenize(node):
    """llama.cpp's server's /tokenize: `content` (a string, or strings and token ids mixed) to
    token ids, with their pieces if asked."""
    req = read_json(node)
    model = _model(req)
    report_ignored(unknown_fields(req, TOKENIZE_FIELDS, "", []))
    content = req.get("content")
    parts = [content] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(
            isinstance(p, (str, int)) and not isinstance(p, bool) for p in parts):
        raise InvalidRequest("'content' must be a string or an array of strings and token ids")
    add_special, parse_special = _bool(req, "add_special"), _bool(req, "parse_special", True)
    with_pieces = _bool(req, "with_pieces")
    entry = node.load(model)
    try:
        llm, tokens = entry.llm, []
        _token_ids(llm, [p for p in parts if isinstance(p, int)], "content")
        for i, part in enumerate(parts):
            if isinstance(part, int):
                tokens.append(part)
            elif part:
                # Only a leading string gets the BOS, as llama.cpp's tokenize_mixed does.
                tokens += llm.tokenize(part.encode("utf-8"), add_bos=add_special and i == 0,
                                       special=parse_special)
        pieces = [token_piece(llm, t) for t in tokens] if with_pieces else None
    finally:
        entry.release()
    if not with_pieces:
        return {"tokens": tokens}
    out = []
    for token, piece in zip(tokens, pieces, strict=True):
        try:
            out.append({"id": token, "piece": piece.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"id": token, "piece": list(piece)})  # part of a character: its bytes
    return {"tokens": out}


@route("POST", "/detokenize")
def detokenize(node):
    """llama.cpp's server's /detokenize: token ids to text, special tokens as their text."""
    req = read_json(node)
    model = _model(req)
    report_ignored(unknown_fields(req, ("model", "tokens"), "", []))
    entry = node.load(model)
    try:
        tokens = _token_ids(entry.llm, req.get("tokens", []), "tokens")
        text = b"".join(token_piece(entry.llm, t) for t in tokens)
    finally:
        entry.release()
    return {"content": text.decode("utf-8", "replace")}


@route("POST", "/apply-template")
def apply_template(node):
    """llama.cpp's server's /apply-template: a chat body's prompt, as the chat route renders it
    (the model's template, its tool prompt, and the Modelfile's system layer when the messages
    have no system message), special tokens as their text; /tokenize with add_special false
    turns it back into the tokens the model reads."""
    req = validate_chat(read_json(node), node.settings.n_ctx)
    report_ignored(req.ignored)
    return {"prompt": node.chat_prompt_text(req)}


###############################################################################
# Operations ##################################################################
###############################################################################
# Health, readiness and metrics: answered at once, whatever the models are doing.

@route("GET", "/health", plain=True)
def health(node):
    """Never waits: not for a load, a generation or a repair."""
    return {"status": "ok", "repairs": node.repairs.active()}


@route("GET", "/ready", plain=True)
def ready(node):
    if node.ready.is_set():
        return {"status": "ready", "loaded": [os.path.basename(p) for p in node.pool.loaded()]}
    bottle.response.status = 503
    return {"status": "not ready", "preload": dict(node.preload_errors)}


@route("GET", "/metrics", plain=True)
def metrics_text(node):
    bottle.response.content_type = "text/plain; version=0.0.4"
    return node.metrics.render()


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
                   help="the auto-repair story on a real model (SmolLM2, fetched once and cached; "
                        "offline, a tiny generated one) with a throwaway store and registry")
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
            body = json.dumps(dialect_of(self.request.path or "").error(err)).encode()
            self.status = "%d %s" % (e.code, e.reason)
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class Channel(HTTPChannel):
        error_task_class = JSONErrorTask

    server = waitress.create_server(make_app(node), host=host, port=port, threads=threads,
                                    ident="llmnode", clear_untrusted_proxy_headers=True,
                                    # Reading ahead is how waitress sees a client close its
                                    # connection while its answer is made (the engine stops it).
                                    channel_request_lookahead=1,
                                    max_request_body_size=node.settings.max_body_bytes + 1)
    server.channel_class = Channel
    return server


def close_server(server):
    """Stop a server from create_server from another thread: its worker threads first (a task
    still finishing its answer pulls waitress's trigger, and a trigger already closed would write
    into whatever file now has its number), then the listening socket and the trigger."""
    server.task_dispatcher.shutdown()
    server.close()


def cmd_serve(settings):
    node = Node(settings)
    node.store.ensure_dirs()
    for path in node.store.remove_temporaries():
        log.info("removed %s, left by an interrupted write", path)
    held = len(node.store.models())
    if held:
        log.info("store %s holds %d model%s", settings.models_dir, held, "" if held == 1 else "s")
    else:
        log.info("store %s holds no models; pull one with: python llmnode.py pull smollm2:135m",
                 settings.models_dir)
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
    """Serve a node on a free loopback port in this process: (node, base url, stop); stop may be
    called more than once."""
    node = Node(settings)
    node.store.ensure_dirs()
    server = create_server(node, "127.0.0.1", 0, threads=8)
    stopped = threading.Event()

    def run():
        try:
            server.run()
        except OSError:
            # Closing the server under its select() loop ends the loop with EBADF.
            if not stopped.is_set():
                raise

    def stop():
        if not stopped.is_set():
            stopped.set()
            close_server(server)

    threading.Thread(target=run, daemon=True).start()
    return node, "http://127.0.0.1:%s" % server.effective_port, stop


def cmd_pull(settings, name):
    node = Node(settings, progress=progress_for)
    ref = names.parse(name)
    log.info("pulling %s", ref)
    _manifest, fetched, moved = operations.pull(node.repairs, ref)
    if moved:
        print("%s: the tag moved (was sha256:%s); now at the new version" % (ref, moved))
    print("pulled %s (%d blob(s) downloaded)" % (ref, len(fetched)))
    return 0


def cmd_verify(settings, name):
    """Full check of every blob; print each problem; exit 1 if any. At the lowest CPU priority, as
    a node's own hashing: a node serving on this host keeps its cores."""
    hashing.lower_priority()  # this thread, and every thread it starts
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
    if not name:
        # Derived data: reported here, dropped by `repair` (or by the node when it meets it).
        good, rotten = PromptCache(node.store.root, settings.prompt_cache_bytes).verify(drop=False)
        print("prompt cache: %d entries ok, %d bad" % (good, rotten))
        bad += rotten
    return 1 if bad else 0


def cmd_repair(settings, name):
    """Fetch the manifest again if it is missing or unusable, then every bad blob: the same
    coordinator as the server (range repair, the cross-process lock, the log lines)."""
    node = Node(settings, progress=progress_for, auto_repair=True)  # `repair` repairs, whatever the setting
    ref = names.parse(name)
    fetched = node.repairs.check_model(ref)
    print("%s: %s" % (ref, "%d blob(s) repaired" % len(fetched) if fetched else "intact"))
    _good, dropped = PromptCache(node.store.root, settings.prompt_cache_bytes).verify(drop=True)
    if dropped:
        print("prompt cache: %d bad entries dropped" % dropped)
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
    entries = PromptCache(store.root, settings.prompt_cache_bytes).entries()
    print("prompt cache: %d entries, %s (at most %s, LLM_PROMPT_CACHE_BYTES)"
          % (len(entries), human_size(sum(size for _path, size in entries)),
             human_size(settings.prompt_cache_bytes)))
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
