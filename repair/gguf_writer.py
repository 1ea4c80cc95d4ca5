"""A GGUF writer and reader for tests and the demo: a tiny llama model with random weights
that llama.cpp loads in milliseconds, and where a GGUF file's tensors lie."""

import struct

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# GGUF value types used below.
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_FIXED = {_U8: 1, _I8: 1, _U16: 2, _I16: 2, _U32: 4, _I32: 4, _F32: 4, _BOOL: 1, _U64: 8, _I64: 8,
          _F64: 8}


def _s(text):
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, vtype, value):
    if vtype == _STR:
        payload = _s(value)
    elif vtype == _ARR:
        etype, items = value
        fmt = {_F32: "<f", _I32: "<i"}.get(etype)
        body = b"".join(_s(i) if etype == _STR else struct.pack(fmt, i) for i in items)
        payload = struct.pack("<IQ", etype, len(items)) + body
    else:
        payload = struct.pack({_U32: "<I", _F32: "<f", _BOOL: "<?"}[vtype], value)
    return _s(key) + struct.pack("<I", vtype) + payload


def tiny_gguf(seed=0, n_embd=64, n_ff=128, n_head=4, n_layer=2, chat_template=CHAT_TEMPLATE,
              context_length=512, reranker=False):
    """A llama-architecture GGUF with a byte vocabulary and random weights (about 460 KB), saying
    it was trained on `context_length` tokens. With `reranker`, a Qwen3-Reranker-shaped one
    instead: the qwen3 architecture, rank pooling and a two-label classification head
    (`cls.output`), whose first label's softmax is the score."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    n_vocab = len(tokens)
    arch = "qwen3" if reranker else "llama"
    kvs = [
        _kv("general.architecture", _STR, arch),
        _kv(arch + ".context_length", _U32, context_length),
        _kv(arch + ".embedding_length", _U32, n_embd),
        _kv(arch + ".block_count", _U32, n_layer),
        _kv(arch + ".feed_forward_length", _U32, n_ff),
        _kv(arch + ".attention.head_count", _U32, n_head),
        _kv(arch + ".attention.head_count_kv", _U32, n_head),
        _kv(arch + ".rope.dimension_count", _U32, n_embd // n_head),
        _kv(arch + ".attention.layer_norm_rms_epsilon", _F32, 1e-5),
        _kv("tokenizer.ggml.model", _STR, "llama"),
        _kv("tokenizer.ggml.tokens", _ARR, (_STR, tokens)),
        _kv("tokenizer.ggml.scores", _ARR, (_F32, [0.0] * n_vocab)),
        _kv("tokenizer.ggml.token_type", _ARR, (_I32, [2, 3, 3] + [6] * 256)),
        _kv("tokenizer.ggml.bos_token_id", _U32, 1),
        _kv("tokenizer.ggml.eos_token_id", _U32, 2),
        _kv("tokenizer.ggml.unknown_token_id", _U32, 0),
        _kv("tokenizer.ggml.add_bos_token", _BOOL, True),
        _kv(arch + ".vocab_size", _U32, n_vocab),
        _kv("tokenizer.chat_template", _STR, chat_template),
    ]
    if reranker:
        # llama.cpp's LLAMA_POOLING_TYPE_RANK (4); the labels set the head's width.
        kvs += [_kv("qwen3.pooling_type", _U32, 4),
                _kv("qwen3.classifier.output_labels", _ARR, (_STR, ["yes", "no"]))]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    tensors = [("token_embd.weight", w(n_vocab, n_embd))]
    for i in range(n_layer):
        tensors += [("blk.%d.attn_norm.weight" % i, ones), ("blk.%d.attn_q.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.attn_k.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.attn_v.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.attn_output.weight" % i, w(n_embd, n_embd)),
                    ("blk.%d.ffn_norm.weight" % i, ones), ("blk.%d.ffn_gate.weight" % i, w(n_ff, n_embd)),
                    ("blk.%d.ffn_down.weight" % i, w(n_embd, n_ff)),
                    ("blk.%d.ffn_up.weight" % i, w(n_ff, n_embd))]
        if reranker:
            head = np.ones(n_embd // n_head, dtype=np.float32)
            tensors += [("blk.%d.attn_q_norm.weight" % i, head), ("blk.%d.attn_k_norm.weight" % i, head)]
    tensors += [("output_norm.weight", ones), ("output.weight", w(n_vocab, n_embd))]
    if reranker:
        # Larger than the other weights, so documents' scores differ visibly.
        tensors += [("cls.output.weight", w(2, n_embd) * 10)]

    infos, data, offset = [], [], 0
    for name, array in tensors:
        dims = list(reversed(array.shape))
        infos.append(_s(name) + struct.pack("<I", len(dims)) + struct.pack("<%dQ" % len(dims), *dims)
                     + struct.pack("<IQ", 0, offset))
        raw = array.tobytes()
        raw += b"\0" * (-len(raw) % 32)
        data.append(raw)
        offset += len(raw)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + b"".join(data)


def tensor_spans(gguf):
    """{tensor name: (start, end)} of each tensor's data in a GGUF file's bytes."""
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, gguf, pos)
        pos += struct.calcsize(fmt)
        return values

    def string():
        nonlocal pos
        (n,) = take("<Q")
        pos += n
        return bytes(gguf[pos - n:pos]).decode("utf-8")

    def skip(vtype):
        nonlocal pos
        if vtype == _STR:
            string()
        elif vtype == _ARR:
            etype, count = take("<IQ")
            if etype in _FIXED:
                pos += _FIXED[etype] * count
            else:
                for _ in range(count):
                    skip(etype)
        else:
            pos += _FIXED[vtype]

    _magic, _version, n_tensors, n_kv = take("<4sIQQ")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = take("<I")
        if key == "general.alignment":
            (alignment,) = take("<I")
        else:
            skip(vtype)
    offsets = {}
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = take("<I")
        pos += 8 * n_dims
        _type, offset = take("<IQ")
        offsets[name] = offset
    data = pos + (-pos % alignment)
    ends = sorted(offsets.values())[1:] + [len(gguf) - data]
    order = sorted(offsets, key=offsets.get)
    return {name: (data + offsets[name], data + end) for name, end in zip(order, ends, strict=True)}
