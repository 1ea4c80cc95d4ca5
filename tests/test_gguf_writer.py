"""The GGUF writer and reader (repair/gguf_writer.py) against the `gguf` package's reader."""

import gguf
import numpy as np

from repair.gguf_writer import CHAT_TEMPLATE, tensor_spans, tiny_gguf


def read(tmp_path, data):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return gguf.GGUFReader(path)


def test_the_tiny_model_reads_as_a_llama_with_its_chat_template(tmp_path):
    reader = read(tmp_path, tiny_gguf())
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHAT_TEMPLATE
    assert len(reader.tensors) == 1 + 2 * 9 + 2  # embeddings, two blocks of nine, norm and output


def test_tensor_spans_are_where_the_gguf_reader_finds_each_tensor(tmp_path):
    data = tiny_gguf(seed=3)
    reader = read(tmp_path, data)
    spans = tensor_spans(data)
    assert sorted(spans) == sorted(t.name for t in reader.tensors)
    for tensor in reader.tensors:
        start, end = spans[tensor.name]
        assert start == tensor.data_offset and end - start >= tensor.n_bytes
        assert data[start:start + tensor.n_bytes] == np.asarray(tensor.data).tobytes()


def test_seeds_change_the_weights_and_nothing_else(tmp_path):
    one, two = tiny_gguf(seed=1), tiny_gguf(seed=2)
    assert len(one) == len(two) and one != two
    assert tensor_spans(one) == tensor_spans(two)
