"""The tiny llama GGUFs for tests: the demo's byte-vocabulary model (one GGUF writer in the code
base), and the same shape carrying a real tokenizer and chat template copied from another GGUF."""

import numpy as np

from repair.gguf_writer import CHAT_TEMPLATE, tiny_gguf

# Token types as llama.cpp reads `tokenizer.ggml.token_type`.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def write_tiny_gguf(path, seed=0, chat_template=CHAT_TEMPLATE, **shape):
    """Write the model to `path` (about 460 KB; different seeds give different weights; `shape`:
    tiny_gguf's context_length or reranker)."""
    with open(path, "wb") as f:
        f.write(tiny_gguf(seed=seed, chat_template=chat_template, **shape))
    return path


def write_tiny_bpe_gguf(path, source, chat_template=None, added_tokens=(), seed=0, context_length=32768,
                        n_embd=64, n_ff=128, n_head=4, n_layer=2, favoured=None):
    """A 2-layer random-weight llama GGUF with the tokenizer of the GGUF at `source` (its vocabulary,
    merges and special tokens; SmolLM2's BPE in the tests), so prompts have their real size and
    prefill takes seconds. `chat_template` replaces the source's; `added_tokens` are (text, type)
    pairs appended to the vocabulary (a reasoning format's markers). `favoured` maps token texts
    to how far (in logits) the model prefers them over every other token, at every position
    (see `BRIEF`). About 6 MB."""
    import gguf  # a test dependency, as the `gguf` package is not the node's

    reader = gguf.GGUFReader(str(source))
    fields = reader.fields

    def value(name):
        return fields[name].contents()

    tokens = list(value("tokenizer.ggml.tokens"))
    types = list(value("tokenizer.ggml.token_type"))
    for text, kind in added_tokens:
        tokens.append(text)
        types.append(kind)
    template = chat_template if chat_template is not None else value("tokenizer.chat_template")
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model(value("tokenizer.ggml.model"))
    if "tokenizer.ggml.pre" in fields:
        w.add_tokenizer_pre(value("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if "tokenizer.ggml.merges" in fields:
        w.add_token_merges(list(value("tokenizer.ggml.merges")))
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id)):
        if "tokenizer.ggml." + key in fields:
            add(int(value("tokenizer.ggml." + key)))
    if "tokenizer.ggml.add_bos_token" in fields:
        w.add_add_bos_token(bool(value("tokenizer.ggml.add_bos_token")))
    w.add_chat_template(template)

    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    embd = rand(n_vocab, n_embd)
    if favoured:
        # Every embedding leans along one direction, so the last hidden state (the residual stream,
        # which the small random layers barely move, normalized to length sqrt(n_embd)) points
        # that way whatever the input; with the output tied to the embeddings, a token's logit is
        # then about sqrt(n_embd) times its embedding's length along that direction.
        lean = rng.standard_normal(n_embd)
        lean = (lean / np.linalg.norm(lean)).astype(np.float32)
        embd += 2 * lean
        for text, gap in favoured.items():
            embd[tokens.index(text)] = (2 + gap / np.sqrt(n_embd)) * lean
    # No output.weight: llama.cpp ties the output to the token embeddings, halving the file.
    w.add_tensor("token_embd.weight", embd.astype(np.float16))
    for i in range(n_layer):
        w.add_tensor("blk.%d.attn_norm.weight" % i, ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor("blk.%d.%s.weight" % (i, name), rand(n_embd, n_embd))
        w.add_tensor("blk.%d.ffn_norm.weight" % i, ones)
        w.add_tensor("blk.%d.ffn_gate.weight" % i, rand(n_ff, n_embd))
        w.add_tensor("blk.%d.ffn_down.weight" % i, rand(n_embd, n_ff))
        w.add_tensor("blk.%d.ffn_up.weight" % i, rand(n_ff, n_embd))
    w.add_tensor("output_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# A model that answers briefly under any grammar, so an agent's turn ends in seconds: the end of
# turn whenever it may come, else (inside a JSON string, where a grammar bars the end) a closing
# quote about one step in eight, a closing brace as soon as an object may close, and the
# `response` key over `tool_call` when a tool grammar lets it choose (SmolLM2's token texts).
BRIEF = {"<|im_end|>": 60.0, "\"": 9.0, "}": 9.0, "response": 6.0}
