"""A tiny llama-architecture GGUF (2 layers, 64 wide, byte vocabulary, random weights) for tests."""

import numpy as np

N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_LAYER = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def vocabulary():
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE
    return tokens, types


def write_tiny_gguf(path, seed=0):
    """Write the model to `path` (about 460 KB; different seeds give different weights)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    n_vocab = len(tokens)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        w.add_tensor("blk.%d.attn_norm.weight" % i, np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor("blk.%d.attn_q.weight" % i, weight(N_EMBD, N_EMBD))
        w.add_tensor("blk.%d.attn_k.weight" % i, weight(N_EMBD, N_EMBD))
        w.add_tensor("blk.%d.attn_v.weight" % i, weight(N_EMBD, N_EMBD))
        w.add_tensor("blk.%d.attn_output.weight" % i, weight(N_EMBD, N_EMBD))
        w.add_tensor("blk.%d.ffn_norm.weight" % i, np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor("blk.%d.ffn_gate.weight" % i, weight(N_FF, N_EMBD))
        w.add_tensor("blk.%d.ffn_down.weight" % i, weight(N_EMBD, N_FF))
        w.add_tensor("blk.%d.ffn_up.weight" % i, weight(N_FF, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, N_EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
