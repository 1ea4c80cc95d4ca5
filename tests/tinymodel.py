"""The tiny llama GGUF for tests: the demo's writer (one GGUF writer in the code base)."""

from repair.demo import CHAT_TEMPLATE, tiny_gguf


def write_tiny_gguf(path, seed=0, chat_template=CHAT_TEMPLATE, **shape):
    """Write the model to `path` (about 460 KB; different seeds give different weights; `shape`:
    tiny_gguf's context_length or reranker)."""
    with open(path, "wb") as f:
        f.write(tiny_gguf(seed=seed, chat_template=chat_template, **shape))
    return path
