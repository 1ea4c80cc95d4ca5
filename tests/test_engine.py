"""The engine: continuous batching, the prompt cache, logprobs and n, one request type for every
dialect, on the tiny model and on SmolLM2 through a real waitress server."""

import json
import queue
import threading

import ollama
import openai
import pytest
import requests

import llmnode
from tests.conftest import blob_of, rot, served_node, settings_for, wait_for

SMOL = "smollm2:135m"
TINY = "gpt-oss:7b"
QUESTIONS = ["Tell me about cats.", "What is 2+2?", "Name three colors.", "Who wrote Hamlet?",
             "What is the sea?", "Describe a tree.", "Why is the sky blue?", "What is bread?"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2, tiny_gguf):
    """A node in this process (its slots can be looked at) over SmolLM2 and the tiny model."""
    with served_node(tmp_path_factory, "engine", {SMOL: smollm2, TINY: tiny_gguf}, threads=16,
                     LLM_CTX_SIZE="2048", LLM_CPU_THREADS="2", LLM_MAX_LOADED_MODELS="2",
                     LLM_PARALLEL="4") as s:
        yield s


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def streamed(client, model, question, **kw):
    text, usage = "", None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], stream=True,
            stream_options={"include_usage": True}, temperature=0, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
        usage = chunk.usage or usage
    return text, usage


def concurrently(fn, args):
    results, errors = {}, []

    def one(i, a):
        try:
            results[i] = fn(*a)
        except Exception as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return [results[i] for i in range(len(args))]


@pytest.mark.parametrize("model", [TINY, SMOL])
def test_eight_concurrent_streams_finish_and_each_says_what_it_says_alone(client, model):
    alone = [streamed(client, model, q, max_tokens=24)[0] for q in QUESTIONS]
    together = concurrently(lambda q: streamed(client, model, q, max_tokens=24)[0],
                            [(q,) for q in QUESTIONS])
    assert all(alone) and together == alone


def test_a_client_that_goes_away_frees_its_sequence_within_one_step(served):
    node = served.node
    req = llmnode.validate_chat({"model": SMOL, "stream": True, "max_tokens": 1000, "temperature": 0,
                                 "messages": [{"role": "user", "content": "Count to a thousand."}]},
                                node.settings.n_ctx)
    answer = node.chat(req)
    # The route's body:
    stream = llmnode.frames(llmnode.OPENAI, llmnode.openai_chat_chunks(answer, req), answer)
    for line in stream:
        if '"content": "' in line and '"content": ""' not in line:
            break
    slots = node.pool.entry(blob_of(served.models_dir, ("smollm2", "135m"))[1]).llm.slots
    task = next(t for t in slots.busy if t is not None)
    at_close = task.generated
    stream.close()  # what waitress does when the client's socket is gone
    wait_for(lambda: not any(slots.busy), "the sequence to be free")
    assert task.generated - at_close <= 1  # at most the token of the step under way


def test_follow_up_turns_of_interleaved_conversations_prefill_only_their_new_tokens(client):
    system = "You are a patient teacher. " * 60  # ~400 tokens each conversation shares with no other
    convs = [[{"role": "system", "content": "%d. %s" % (i, system)},
              {"role": "user", "content": q}] for i, q in enumerate(QUESTIONS[:4])]

    def turn(messages):
        r = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=8, temperature=0)
        return r.choices[0].message.content, r.usage

    first = concurrently(turn, [(c,) for c in convs])
    for c, (answer, _usage) in zip(convs, first, strict=True):
        c += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = concurrently(turn, [(c,) for c in convs])
    for (_a, cold), (_b, warm) in zip(first, second, strict=True):
        assert cold.prompt_tokens_details.cached_tokens < 40  # at most the default system prompt's
        # Everything of the first turn but its last answer token is still in the sequence.
        assert warm.prompt_tokens_details.cached_tokens >= cold.prompt_tokens
        assert warm.prompt_tokens > warm.prompt_tokens_details.cached_tokens


def test_a_schema_a_tool_call_and_free_streams_share_one_batch_each_valid(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}

    def structured():
        r = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
            stream=True, temperature=0)
        doc = json.loads("".join(c.choices[0].delta.content or "" for c in r if c.choices))
        assert isinstance(doc["name"], str) and isinstance(doc["age"], int)
        return "schema"

    def tool():
        r = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
            tool_choice="required", max_tokens=60, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
        return "tool"

    def free():
        r = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Say something."}], max_tokens=12,
            logprobs=True, top_logprobs=3, temperature=0)
        items = r.choices[0].logprobs.content
        assert len(items) == r.usage.completion_tokens
        for item in items:
            assert item.logprob <= 0 and len(item.top_logprobs) == 3
            # At temperature 0 the sampled token is the most likely one.
            first, second, third = (alt.logprob for alt in item.top_logprobs)
            assert first >= second >= third
            assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-6
        return "free"

    assert concurrently(lambda f: f(), [(structured,), (tool,), (free,), (free,)]) == \
        ["schema", "tool", "free", "free"]


def test_n_answers_stream_from_one_prefill(client):
    texts = {}
    for chunk in client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Name a fruit."}], n=3, stream=True,
            max_tokens=10, temperature=0):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    alone = streamed(client, SMOL, "Name a fruit.", max_tokens=10)[0]
    assert texts == {0: alone, 1: alone, 2: alone}


def test_completions_logprobs(client):
    r = client.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=4,
                                  logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(alts) == 2 for alts in lp.top_logprobs)


def test_a_repair_of_one_model_does_not_stop_another_models_stream(served, client):
    """The tiny model is damaged and its repair held at the registry; SmolLM2's stream keeps
    flowing meanwhile, and both answer."""
    gate = threading.Event()
    served.registry.gate = gate
    rot(blob_of(served.models_dir)[1], n=64, keep_times=False)
    repaired = {}
    t = threading.Thread(target=lambda: repaired.update(r=requests.post(
        served.url + "/v1/chat/completions", timeout=300,
        json={"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})))
    try:
        stream = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Write a long story."}], stream=True,
            max_tokens=400, temperature=0)
        pieces = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
            if pieces == 2:
                t.start()
                wait_for(lambda: served.node.repairs.active(), "the repair to start")
            if pieces > 2 and not gate.is_set():
                # A piece arrived while the other model's repair waits on the registry.
                assert served.node.repairs.active()
                if pieces == 40:
                    gate.set()
        assert pieces > 40
    finally:
        gate.set()
        served.registry.gate = None
        if t.is_alive() or t.ident:
            t.join(300)
    assert repaired["r"].status_code == 200, repaired["r"].text


def test_a_streamed_ollama_chat_with_tools_ends_like_the_unstreamed_one(served):
    c = ollama.Client(host=served.url)
    # No num_predict, as langchain-ollama sends it (num_ctx only bounds a rambling answer).
    ask = dict(model=SMOL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
               tools=[WEATHER], options={"temperature": 0, "num_ctx": 512})
    c.chat(**ask)
    # Both read the prompt from the same cache (llama.cpp's one-token and many-token kernels
    # round differently, so a cold read may say something else): they must say the same thing.
    whole = c.chat(**ask)
    parts = list(c.chat(stream=True, **ask))
    content = "".join(p.message.content or "" for p in parts)
    calls = [call for p in parts for call in (p.message.tool_calls or [])]
    last = parts[-1]
    # The stream used to run to the end of the context and hand out the tool format's raw JSON.
    assert last.done and (last.done_reason, last.eval_count) == (whole.done_reason, whole.eval_count)
    assert content == (whole.message.content or "")
    assert [(x.function.name, x.function.arguments) for x in calls] == \
        [(x.function.name, x.function.arguments) for x in whole.message.tool_calls or []]
    assert not content.lstrip().startswith(("{", "<tool_call>"))
    assert content or calls


def test_an_answer_cut_by_its_budget_in_the_tool_format_is_its_text_so_far(client):
    r = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Tell me about Paris."}], tools=[WEATHER],
        tool_choice="auto", temperature=0, max_tokens=12)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    # Without the format's `{"response": "` and with its escapes decoded.
    assert choice.message.content and not choice.message.content.lstrip().startswith("{")
    assert '"response"' not in choice.message.content


def test_the_same_request_gives_the_same_tokens_through_v1_and_api_chat(served, client):
    messages = [{"role": "user", "content": "What is the sea?"}]
    v1 = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=30, temperature=0)
    api = ollama.Client(host=served.url).chat(model=SMOL, messages=messages,
                                              options={"temperature": 0, "num_predict": 30})
    assert v1.choices[0].message.content == api.message.content
    assert api.eval_count == v1.usage.completion_tokens


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_greedy_under_a_grammar_picks_what_the_whole_vocabulary_pass_picks(which, tmp_path, tiny_gguf):
    """The shortcut (the grammar checked on the likeliest tokens first) against the grammar applied
    to every token, step by step along one answer, on random weights (whose likeliest tokens the
    grammar mostly refuses) and on the real model."""
    if which == "tiny":
        path = tmp_path / "tiny.gguf"
        path.write_bytes(tiny_gguf)
    else:
        from tests.conftest import smollm2_path
        path = smollm2_path()
    settings = settings_for(str(tmp_path / "models"), "http://127.0.0.1:9", LLM_CPU_THREADS="2")
    llm = llmnode.load_llama(str(path), settings)
    ctx = llmnode.BatchedContext(llm, 1, 512, 2)
    samplers = llmnode.Samplers(ctx)
    gram = llmnode.grammar({"type": "object", "properties": {"city": {"type": "string"},
                                                             "rank": {"type": "integer"}}})
    fast = samplers.build(llmnode.Sampling(temperature=0, grammar=gram))
    whole = samplers.build(llmnode.Sampling(temperature=0, grammar=gram))
    assert fast.greedy and whole.greedy  # greedy alone in the chain: the shortcut applies
    prompt = llm.tokenize(b"Describe Paris as JSON:", add_bos=True, special=False)
    ctx.decode([(t, k, [0], k == len(prompt) - 1) for k, t in enumerate(prompt)])
    at, pos, shortcuts, likeliest = len(prompt) - 1, len(prompt), 0, 0
    for _step in range(40):
        expected = samplers.pick(whole, at)
        top = [int(t) for t in ctx.logits(at).argsort()[::-1][:samplers.GREEDY_FIRST]]
        shortcuts += expected in samplers.allows(fast, top)  # found among the likeliest
        likeliest += expected == int(ctx.logits(at).argmax())  # the likeliest token, checked alone
        got = samplers.sample(fast, at)
        assert got == expected
        samplers.accept(whole, expected)
        if ctx.is_eog(got):
            break
        ctx.decode([(got, pos, [0], True)])
        at, pos = 0, pos + 1
    assert shortcuts > 0
    assert likeliest > 0 or which == "tiny"  # random weights: the grammar refuses the likeliest
    for sampler in (fast, whole):
        samplers.free(sampler)
    ctx.close()
    llm.close()


def test_a_second_conversation_sharing_a_running_ones_system_prompt_starts_from_its_cells(client):
    # ~300 tokens of instructions no other test's prompt starts with.
    system = "Session 7f3a. " + "You are a careful assistant; answer in one short sentence. " * 25
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Count to a thousand."}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "What is bread?"}]

    def ask(messages, max_tokens=16):
        r = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=max_tokens,
                                           temperature=0)
        return r.choices[0].message.content, r.usage

    def ask_beside(streaming):
        """Ask the second conversation while `streaming` generates (its first words out)."""
        stream = client.chat.completions.create(model=SMOL, messages=streaming, max_tokens=400,
                                                temperature=0, stream=True)
        try:
            next(c for c in stream if c.choices and c.choices[0].delta.content)
            return ask(second)
        finally:
            stream.close()

    _, cold = ask(first, max_tokens=1)
    assert cold.prompt_tokens_details.cached_tokens < 40  # at most the template's opening
    # The reference: the second conversation read on the first one's idle sequence, in place,
    # beside another stream as it will be below (a read from scratch, or in a batch of another
    # make-up, may say something else: llama.cpp's kernels for a whole prompt and for a few
    # tokens round differently).
    alone, alone_usage = ask_beside([{"role": "user", "content": "Count to a thousand."}])
    shared = alone_usage.prompt_tokens_details.cached_tokens
    assert shared > 300
    # The first conversation takes that sequence again and generates there, while the second
    # comes back: it starts from a copy of the running sequence's cells.
    beside, beside_usage = ask_beside(first)
    assert beside_usage.prompt_tokens_details.cached_tokens == shared
    # The same answer, as far as llama.cpp's numerics allow: beside another stream a batch's make-up
    # can round a later token differently (CI saw "a staple of..." against "a type of..."), so the
    # opening words are held equal, not the whole text.
    assert beside.split()[:2] == alone.split()[:2] and beside.split()[:2]


def kv_bytes(llm, kv_type, flash_attn="auto"):
    """llama.cpp's own size of one sequence's KV state after reading a fixed prompt."""
    ctx = llmnode.BatchedContext(llm, 1, 512, 2, kv_type=kv_type, flash_attn=flash_attn)
    try:
        prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 20, add_bos=True,
                              special=False)
        ctx.decode([(t, k, [0], k == len(prompt) - 1) for k, t in enumerate(prompt)])
        samplers = llmnode.Samplers(ctx)
        token = samplers.sample(samplers.build(llmnode.Sampling(temperature=0)), len(prompt) - 1)
        assert 0 <= token < ctx.n_vocab
        return len(ctx.seq_state(0))
    finally:
        ctx.close()


def test_a_q8_0_kv_cache_runs_and_holds_about_half_the_bytes_of_f16(tmp_path):
    from tests.conftest import smollm2_path

    settings = settings_for(str(tmp_path / "models"), "http://127.0.0.1:9", LLM_CPU_THREADS="2")
    llm = llmnode.load_llama(smollm2_path(), settings)
    try:
        f16, q8, q4 = (kv_bytes(llm, t) for t in ("f16", "q8_0", "q4_0"))
        assert 0.45 < q8 / f16 < 0.6  # 34 bytes a block of 32 against 64
        assert 0.25 < q4 / f16 < 0.35
        with pytest.raises(llmnode.ModelLoadFailed, match="LLM_KV_CACHE_TYPE"):
            kv_bytes(llm, "q8_0", flash_attn="off")  # llama.cpp quantises V only with it
    finally:
        llm.close()


@pytest.mark.parametrize("given, asked", [("auto", 0), ("12", 12)])
def test_gpu_layers_reach_the_model_and_the_load_says_how_many_were_offloaded(
        given, asked, tmp_path, tiny_gguf, caplog):
    import logging

    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf)
    settings = settings_for(str(tmp_path / "models"), "http://127.0.0.1:9", LLM_GPU_LAYERS=given)
    with caplog.at_level(logging.INFO):
        llm = llmnode.load_llama(str(path), settings)
    try:
        assert llm.model_params.n_gpu_layers == asked  # this build: no GPU backend, auto is 0
        assert "tiny.gguf: 0 of " in caplog.text and "has no GPU backend" in caplog.text
    finally:
        llm.close()


def test_an_output_holds_what_may_start_a_stop_string_and_joins_a_split_character():
    events = queue.Queue()
    gen = llmnode.Generation(prompt=[1], sampling=llmnode.Sampling(), max_tokens=10, stop=["END"])
    out = llmnode.Output(0, gen, events)
    e = "é".encode()
    assert out.add(1, e[:1]) is None  # half a character: no text yet
    assert out.add(2, e[1:] + b" E") is None  # "é " ready; "E" may start the stop string
    assert "".join(p.text for p in list(events.queue)) == "é "
    assert out.add(3, b"ND and more") == "END"
    finish = out.finish("stop", 3)
    pieces = [events.get_nowait() for _ in range(events.qsize())]
    assert "".join(p.text for p in pieces) == "é " == finish.text
    assert [t for p in pieces for t in p.tokens] == [1, 2, 3]
    assert (finish.reason, finish.stop_sequence, finish.tokens) == ("stop", "END", 3)


def test_a_steps_batch_reaches_llama_cpp_in_sequence_order():
    """Over separate KV streams llama.cpp makes one ubatch only of consecutive, increasing sequence
    ids; a step's items are put in that order, each sequence's tokens kept in position order, and
    each sampled answer's batch index follows its token."""
    a, b, c = object(), object(), object()
    items = [(11, 7, [3], True), (12, 9, [0], True),  # two answers generating
             (20, 0, [1], False), (21, 1, [1], False), (22, 2, [1], True)]  # a prompt's last chunk
    sampled = [(a, 0), (b, 1), (c, 4)]
    ordered, moved = llmnode.by_sequence(items, sampled)
    assert [it[2][0] for it in ordered] == [0, 1, 1, 1, 3]
    assert [it[0] for it in ordered] == [12, 20, 21, 22, 11]
    assert {task: ordered[i][0] for task, i in moved} == {a: 11, b: 12, c: 22}
    assert llmnode.by_sequence(ordered, moved) == (ordered, moved)  # already in order: unchanged
