"""Retrieval through real HTTP on an in-process node and real llama.cpp: rerank on a generated
tiny reranker (rank pooling, a classification head), tokenize / detokenize / apply-template on
SmolLM2, embeddings as long as the model reads, `dimensions` and Ollama's `truncate`."""

import base64
import math
import struct
import subprocess
import threading

import pytest
import requests

import llmnode
from repair import names, operations
from tests.conftest import Served, blob_of, intact, settings_for, wait_for
from tests.fakeregistry import FakeRegistry
from tests.tinymodel import write_tiny_gguf

SMOL = "smollm2:135m"
TINY = "gpt-oss:7b"  # the tiny chat model: a 512-token trained context
LONG = "tiny-long:1"  # the tiny chat model trained (so it says) on 4096 tokens
RERANKER = "reranker:tiny"  # Qwen3-Reranker-shaped: rank pooling, a two-label head
SYSTEM = "smolsys:1"  # SmolLM2 with a Modelfile system layer
SYSTEM_TEXT = "You answer in French."
QUERY = "where do cats sleep"
DOCS = ["Cats sleep on warm windowsills.", "The stock market fell today.",
        "Cats sleep on warm windowsills.", "Quantum chromodynamics binds quarks.",
        "A recipe for lemon cake."]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    work = tmp_path_factory.mktemp("retrieval-gguf")
    return {"reranker": write_tiny_gguf(work / "rr.gguf", seed=3, reranker=True),
            "long": write_tiny_gguf(work / "long.gguf", seed=1, context_length=4096)}


@pytest.fixture(scope="module")
def node(tmp_path_factory, ggufs, smollm2, tiny_gguf):
    reg = FakeRegistry().start()
    reg.add_model("library/smollm2", "135m", smollm2)
    reg.add_model("library/smolsys", "1", smollm2,
                  extra_layers=[("application/vnd.ollama.image.system", SYSTEM_TEXT.encode())])
    reg.add_model("library/gpt-oss", "7b", tiny_gguf)
    reg.add_model("library/tiny-long", "1", ggufs["long"].read_bytes())
    reg.add_model("library/reranker", "tiny", ggufs["reranker"].read_bytes())
    models = str(tmp_path_factory.mktemp("retrieval") / "models")
    settings = settings_for(models, reg.url, LLM_CTX_SIZE="2048", LLM_CPU_THREADS="2",
                            LLM_MAX_LOADED_MODELS="3")
    prompts = []
    n = llmnode.Node(settings, on_prompt=prompts.append)
    for name in (SMOL, SYSTEM, TINY, LONG, RERANKER):
        operations.pull(n.repairs, names.parse(name))
    served = Served(n)
    served.prompts, served.models_dir, served.registry = prompts, models, reg
    yield served
    served.close()
    reg.stop()


def llama_cpp_scores(path, query, documents):
    """Each document's score as llama.cpp reads it, on a context of this test's own: the rank
    pooling's first output for BOS + query + document (the tiny vocabulary adds no EOS/SEP)."""
    import llama_cpp as C
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    model = C.llama_model_load_from_file(str(path).encode(), C.llama_model_default_params())
    params = C.llama_context_default_params()
    params.embeddings, params.n_ctx, params.n_batch, params.n_ubatch = True, 512, 512, 512
    ctx = C.llama_init_from_model(model, params)
    batch = C.llama_batch_init(512, 0, 1)
    scores = []
    try:
        for doc in documents:
            tokens = [llm.token_bos()] + llm.tokenize(query.encode(), add_bos=False) + \
                llm.tokenize(doc.encode(), add_bos=False)
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            assert C.llama_decode(ctx, batch) == 0
            scores.append(C.llama_get_embeddings_seq(ctx, 0)[0])
            C.llama_memory_clear(C.llama_get_memory(ctx), True)
    finally:
        C.llama_batch_free(batch)
        C.llama_free(ctx)
        C.llama_model_free(model)
        llm.close()
    return scores


# -- rerank ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_scores_come_from_llama_cpp_and_order_follows_them(node, ggufs, path):
    r = node.post(path, {"model": RERANKER, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == RERANKER and body["object"] == "list"
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCS)))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    by_index = {x["index"]: x["relevance_score"] for x in results}
    assert by_index[0] == by_index[2]  # the same document, the same score
    assert len(set(by_index.values())) == len(DOCS) - 1
    expected = llama_cpp_scores(ggufs["reranker"], QUERY, DOCS)
    assert [by_index[i] for i in range(len(DOCS))] == pytest.approx(expected, abs=1e-5)
    assert "document" not in results[0]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len("".join(DOCS))


def test_top_n_and_return_documents_are_honoured(node):
    full = node.post("/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCS}).json()
    r = node.post("/v1/rerank", {"model": RERANKER, "query": QUERY, "top_n": 2, "return_documents": True,
                                 "documents": [{"text": d} for d in DOCS]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["index"], x["relevance_score"]) for x in results] == \
        [(x["index"], x["relevance_score"]) for x in full["results"][:2]]
    assert [x["document"] for x in results] == [{"text": DOCS[x["index"]]} for x in results]


def test_a_chat_model_is_refused_by_name(node):
    r = node.post("/v1/rerank", {"model": TINY, "query": QUERY, "documents": DOCS})
    assert r.status_code == 400, r.text
    assert TINY in r.json()["error"]["message"] and "rank" in r.json()["error"]["message"]


def test_a_reranker_gives_no_embeddings(node):
    r = node.post("/v1/embeddings", {"model": RERANKER, "input": "x"})
    assert r.status_code == 400 and "/v1/rerank" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, field", [
    ({"query": "", "documents": DOCS}, "query"),
    ({"query": QUERY, "documents": []}, "documents"),
    ({"query": QUERY, "documents": ["a", {"txt": "b"}]}, "documents[1]"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
    ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "return_documents"),
    ({"query": QUERY, "documents": DOCS, "rank_fields": ["x"]}, "rank_fields"),
])
def test_bad_rerank_bodies_are_400_naming_the_field(node, body, field):
    r = node.post("/v1/rerank", dict(body, model=RERANKER))
    assert r.status_code == 400 and "'%s'" % field in r.json()["error"]["message"], r.text


def test_a_document_longer_than_the_reranker_reads_is_refused_by_index(node):
    r = node.post("/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": ["short", "x" * 600]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "'documents[1]'" in r.json()["error"]["message"]


def test_a_corrupted_reranker_blob_is_repaired_inside_the_request(node):
    before = node.post("/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCS}).json()
    layer, blob = blob_of(node.models_dir, ("reranker", "tiny"))
    served = node.registry.bytes_served[layer["digest"]]
    subprocess.run('echo "corrupted" > %s' % blob, shell=True, check=True)
    r = node.post("/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == before["results"]
    assert intact(blob, layer)
    assert node.registry.bytes_served[layer["digest"]] - served >= layer["size"] // 2


# -- tokenize, detokenize, apply-template ---------------------------------------------------------

@pytest.fixture(scope="module")
def smol_tokenizer(smollm2):
    from llama_cpp import Llama

    from tests.conftest import smollm2_path

    llm = Llama(model_path=smollm2_path(), vocab_only=True, verbose=False)
    yield llm
    llm.close()


TEXT = "Héllo wörld 🐈 <|im_start|>user\n  indented\ttabs ünïcödé"


@pytest.mark.parametrize("add_special", [False, True])
def test_tokenize_and_detokenize_round_trip_as_llama_cpp_pythons_tokenizer(node, smol_tokenizer, add_special):
    r = node.post("/tokenize", {"model": SMOL, "content": TEXT, "add_special": add_special})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert tokens == smol_tokenizer.tokenize(TEXT.encode(), add_bos=add_special, special=True)
    plain = node.post("/tokenize", {"model": SMOL, "content": TEXT, "parse_special": False}).json()["tokens"]
    assert plain == smol_tokenizer.tokenize(TEXT.encode(), add_bos=False, special=False) != tokens
    r = node.post("/detokenize", {"model": SMOL, "tokens": tokens})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == smol_tokenizer.detokenize(tokens, special=True).decode()
    if not add_special:
        assert r.json()["content"] == TEXT


def test_tokenize_with_pieces_gives_each_tokens_text_or_bytes(node, smol_tokenizer):
    r = node.post("/tokenize", {"model": SMOL, "content": TEXT, "with_pieces": True})
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == smol_tokenizer.tokenize(TEXT.encode(), add_bos=False, special=True)
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                      for p in pieces)
    assert joined.decode() == TEXT
    assert any(isinstance(p["piece"], list) for p in pieces)  # the cat emoji is split over tokens


def test_tokenize_refuses_ids_outside_the_vocabulary(node):
    for path, body in (("/detokenize", {"tokens": [10 ** 9]}), ("/tokenize", {"content": ["a", -1]})):
        r = node.post(path, dict(body, model=SMOL))
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"], r.text


def test_apply_template_equals_the_prompt_the_chat_route_renders(node, smol_tokenizer):
    messages = [{"role": "user", "content": "Name a cat."}]
    r = node.post("/api/chat", {"model": SYSTEM, "messages": messages, "stream": False,
                                "options": {"num_predict": 1}})
    assert r.status_code == 200, r.text
    rendered = node.prompts[-1]
    r = node.post("/apply-template", {"model": SYSTEM, "messages": messages})
    assert r.status_code == 200, r.text
    prompt = r.json()["prompt"]
    assert SYSTEM_TEXT in prompt and "<|im_start|>system" in prompt
    tokens = node.post("/tokenize", {"model": SYSTEM, "content": prompt}).json()["tokens"]
    # The chat route's hook shows the tokens' text without the special tokens' own.
    assert smol_tokenizer.detokenize(tokens).decode() == rendered
    own = [{"role": "system", "content": "Be brief."}] + messages
    prompt = node.post("/apply-template", {"model": SYSTEM, "messages": own}).json()["prompt"]
    assert "Be brief." in prompt and SYSTEM_TEXT not in prompt


# -- embeddings as long as the model reads --------------------------------------------------------

def long_text(model, node, n):
    """A text of about n tokens on a model (cut at a token boundary, it may tokenize a few tokens
    differently), and its tokens."""
    text = " ".join("w%d" % i for i in range(n))
    tokens = node.post("/tokenize", {"model": model, "content": text}).json()["tokens"]
    text = node.post("/detokenize", {"model": model, "tokens": tokens[:n]}).json()["content"]
    tokens = node.post("/tokenize", {"model": model, "content": text, "add_special": True}).json()["tokens"]
    assert n - 2 <= len(tokens) <= n + 8
    return text, tokens


def embed_whole(node, model, text, tokens):
    """Embed a long text; check every token was read (the vector differs from its head's)."""
    # SmolLM2 reads 3000 tokens in seconds on two idle cores, in minutes on busy ones.
    r = requests.post(node.url + "/v1/embeddings", json={"model": model, "input": text}, timeout=900)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tokens)
    whole = r.json()["data"][0]["embedding"]
    head = node.post("/v1/embeddings", {"model": model, "input": [tokens[:400]]}).json()
    head = head["data"][0]["embedding"]
    assert abs(math.fsum(x * x for x in whole) - 1) < 1e-6
    assert max(abs(a - b) for a, b in zip(whole, head, strict=True)) > 1e-3


def test_a_3000_token_input_embeds_whole_on_the_tiny_model(node):
    embed_whole(node, LONG, *long_text(LONG, node, 3000))


def test_a_3000_token_input_embeds_whole_on_smollm2_while_answers_go_on(node):
    text, tokens = long_text(SMOL, node, 3000)
    node.post("/v1/embeddings", {"model": SMOL, "input": "x"})  # its embedding context exists
    entry = node.node.load(SMOL)
    context = entry.llm.embedder
    entry.release()
    done = []
    embedding = threading.Thread(target=lambda: done.append(embed_whole(node, SMOL, text, tokens)))
    embedding.start()
    try:
        wait_for(context.lock.locked, "the long input to be read", timeout=120)
        # The input is read 512 tokens a compute step: an answer beside it goes on between them.
        r = node.post("/v1/chat/completions", {"model": LONG, "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert embedding.is_alive() and not done
    finally:
        embedding.join(900)
    assert done == [None]


@pytest.mark.parametrize("route", ["/v1/embeddings", "/api/embed"])
def test_dimensions_give_the_renormalised_prefix(node, route):
    key = "embeddings" if route == "/api/embed" else "data"

    def embed(**extra):
        r = node.post(route, dict({"model": SMOL, "input": ["The cat sat on the mat", "Stocks fell"]},
                                  **extra))
        assert r.status_code == 200, r.text
        body = r.json()[key]
        return body if route == "/api/embed" else [d["embedding"] for d in body]

    full, short = embed(), embed(dimensions=64)
    for f, s in zip(full, short, strict=True):
        assert len(s) == 64 and abs(math.fsum(x * x for x in s) - 1) < 1e-6
        norm = math.sqrt(math.fsum(x * x for x in f[:64]))
        assert s == pytest.approx([x / norm for x in f[:64]], abs=1e-6)


def test_dimensions_above_the_models_size_are_refused_by_name(node):
    r = node.post("/v1/embeddings", {"model": SMOL, "input": "x", "dimensions": 577})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert "'dimensions'" in r.json()["error"]["message"] and "576" in r.json()["error"]["message"]


def test_too_long_is_a_400_for_openai_and_for_ollama_without_truncate(node):
    text, tokens = long_text(TINY, node, 600)
    r = node.post("/v1/embeddings", {"model": TINY, "input": text})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "512" in r.json()["error"]["message"]
    r = node.post("/api/embed", {"model": TINY, "input": text, "truncate": False})
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"]
    assert r.json()["error"].startswith("input exceeds maximum context length")
    r = node.post("/api/embeddings", {"model": TINY, "prompt": text})  # the older route: no truncate
    assert r.status_code == 400 and "'prompt'" in r.json()["error"], r.text


def test_ollama_truncates_by_default_to_the_context_or_num_ctx(node):
    text, tokens = long_text(TINY, node, 600)
    cut = node.post("/api/embed", {"model": TINY, "input": text})
    assert cut.status_code == 200, cut.text
    assert cut.json()["prompt_eval_count"] == 512
    first = node.post("/v1/embeddings", {"model": TINY, "input": [tokens[:512]]}).json()
    assert cut.json()["embeddings"][0] == pytest.approx(first["data"][0]["embedding"], abs=1e-6)
    short = node.post("/api/embed", {"model": TINY, "input": text, "truncate": True,
                                     "options": {"num_ctx": 100}})
    assert short.json()["prompt_eval_count"] == 100


def test_the_encoding_format_is_kept_for_long_inputs(node):
    text, _tokens = long_text(LONG, node, 1000)
    f = node.post("/v1/embeddings", {"model": LONG, "input": text}).json()["data"][0]["embedding"]
    b = node.post("/v1/embeddings", {"model": LONG, "input": text, "encoding_format": "base64"})
    raw = base64.b64decode(b.json()["data"][0]["embedding"])
    assert list(struct.unpack("<%df" % (len(raw) // 4), raw)) == pytest.approx(f, abs=1e-6)


def test_the_embedding_context_is_made_once_and_freed_with_the_model(node):
    node.post("/v1/embeddings", {"model": LONG, "input": "x"})
    entry = node.node.load(LONG)
    try:
        made = entry.llm.embedder
        assert made.n_ctx == 4096 and made.ctx
    finally:
        entry.release()
    node.post("/v1/embeddings", {"model": LONG, "input": "y"})
    entry = node.node.load(LONG)
    try:
        assert entry.llm.embedder is made
    finally:
        entry.release()
