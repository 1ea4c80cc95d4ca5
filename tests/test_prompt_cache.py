"""The prompt cache on disk: long prompts' KV states saved under the store, restored after a
restart or an unload only once their sha256 checks, dropped when rotten, never restored under
other weights or settings; on SmolLM2 in nodes of this process sharing one store."""

import json
import logging
import os
import shutil
import subprocess
import threading
import uuid

import pytest

import llmnode
from repair import operations
from repair.kvcache import PromptCache, key_id
from tests.conftest import node_env, rot, run_cli, settings_for
from tests.fakeregistry import FakeRegistry

SMOL = "smollm2:135m"
MIN = 256  # LLM_PROMPT_CACHE_MIN here: prompts of ~400 tokens are saved


@pytest.fixture(scope="module")
def store(tmp_path_factory, smollm2):
    reg = FakeRegistry().start()
    reg.add_model("library/smollm2", "135m", smollm2)
    models = str(tmp_path_factory.mktemp("kv") / "models")
    node = llmnode.Node(settings_for(models, reg.url))
    operations.pull(node.repairs, llmnode.names.parse(SMOL))
    yield models, reg.url
    reg.stop()


@pytest.fixture
def nodes(store):
    """Make nodes on the shared store (each one a restart); every one is unloaded after."""
    made = []

    def make(**env):
        env = dict({"LLM_CTX_SIZE": "2048", "LLM_CPU_THREADS": "2", "LLM_PARALLEL": "2",
                    "LLM_PROMPT_CACHE_MIN": str(MIN)}, **env)
        node = llmnode.Node(settings_for(store[0], store[1], **env))
        made.append(node)
        return node

    yield make
    for node in made:
        for path in node.pool.loaded():
            node.pool.drop(path)


def conversation():
    """A chat of ~400 tokens whose instructions no other test's start with."""
    system = "Session %s. " % uuid.uuid4().hex + "You are a careful assistant; answer in one sentence. " * 30
    return [{"role": "system", "content": system}, {"role": "user", "content": "What is bread?"}]


def ask(node, messages):
    """(text, usage) of a temperature-0 chat of 12 tokens; its state saved before it returns."""
    req = llmnode.validate_chat({"model": SMOL, "messages": messages, "max_tokens": 12,
                                 "temperature": 0}, node.settings.n_ctx)
    answer = node.chat(req)
    ended, _ = answer.collect()
    assert node.prompt_cache.flush(60)
    return ended[0].message.content, answer.usage


def entry_files(models):
    kv = os.path.join(models, ".llmnode", "kv")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(kv) for f in files if f.endswith(".kv"))


def saved_entry(models, before):
    [path] = sorted(set(entry_files(models)) - set(before))
    return path


def test_after_a_restart_the_saved_prefix_is_restored_and_says_the_same(nodes, store):
    messages, before = conversation(), entry_files(store[0])
    first = nodes()
    cold, cold_usage = ask(first, messages)
    assert cold_usage.cached_tokens < 40 and cold_usage.prompt_tokens > MIN
    saved_entry(store[0], before)
    # The same prompt again, from the sequence's own cells: the reference for a restore (which
    # also reads only the last prompt token).
    in_memory, usage = ask(first, messages)
    assert usage.cached_tokens == usage.prompt_tokens - 1
    restarted = nodes()
    restored, usage = ask(restarted, messages)
    assert usage.cached_tokens == usage.prompt_tokens - 1
    assert restored == in_memory


def test_after_a_keep_alive_unload_the_saved_prefix_is_restored(nodes, store):
    messages = conversation()
    node = nodes(LLM_KEEP_ALIVE="0")  # unloaded after every request
    cold, _ = ask(node, messages)
    again, usage = ask(node, messages)
    assert not node.pool.loaded()
    assert usage.cached_tokens == usage.prompt_tokens - 1
    assert again


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_entry_is_found_before_restore_deleted_and_its_prefix_read_again(
        damage, nodes, store, caplog):
    messages, before = conversation(), entry_files(store[0])
    cold, _ = ask(nodes(), messages)
    path = saved_entry(store[0], before)
    if damage == "flipped byte":
        rot(path, n=1)
    else:
        os.truncate(path, os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING):
        answer, usage = ask(nodes(), messages)
    assert usage.cached_tokens < 40  # read again, not restored
    assert answer == cold
    assert "prompt cache entry %s deleted" % path in caplog.text
    # Saved again once read: the entry on disk is whole.
    assert PromptCache(store[0], 1 << 40).verify() == (len(entry_files(store[0])), 0)


def test_a_cache_that_cannot_be_read_is_a_miss_not_a_failure(nodes, store, caplog):
    messages, before = conversation(), entry_files(store[0])
    cold, _ = ask(nodes(), messages)
    path = saved_entry(store[0], before)
    os.remove(path)
    os.mkdir(path)  # its state file now cannot be read (IsADirectoryError, as EIO would be an OSError)
    try:
        with caplog.at_level(logging.WARNING):
            answer, usage = ask(nodes(), messages)
    finally:
        os.rmdir(path)  # and the entry gone: the store is the next tests' too
        os.remove(path[:-len(".kv")] + ".json")
    assert usage.cached_tokens < 40 and answer == cold  # read again, answered
    assert "prompt cache: could not be read" in caplog.text


def test_a_state_saved_under_other_settings_is_never_restored(nodes, store):
    messages, before = conversation(), entry_files(store[0])
    ask(nodes(), messages)
    path = saved_entry(store[0], before)
    other = nodes(LLM_KV_CACHE_TYPE="q8_0")  # a KV cache of another type: states of another shape
    assert ask(other, [{"role": "user", "content": "Hi"}])[0]  # loaded (its key known), and answers
    slots = other.pool.entry(other.pool.loaded()[0]).llm.slots
    # Even put where the other key's entries are, the record's key does not match.
    planted = os.path.join(os.path.dirname(os.path.dirname(path)), key_id(slots.key))
    os.makedirs(planted, exist_ok=True)
    for f in (path, path[:-3] + ".json"):
        shutil.copy(f, planted)
    answer, usage = ask(other, messages)
    assert usage.cached_tokens < 40 and answer
    # And a node of yet another context size finds neither.
    _, usage = ask(nodes(LLM_CTX_SIZE="1024"), messages)
    assert usage.cached_tokens < 40


def test_two_nodes_save_and_restore_one_prefix_at_once(nodes, store):
    messages = conversation()
    for _round in ("save", "restore"):
        pair = [nodes(), nodes()]
        results = {}
        threads = [threading.Thread(target=lambda k=k, pair=pair, results=results:
                                    results.update({k: ask(pair[k], messages)})) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert results[0][0] == results[1][0]
        good, dropped = PromptCache(store[0], 1 << 40).verify()
        assert dropped == 0 and good == len(entry_files(store[0]))
    assert all(u.cached_tokens == u.prompt_tokens - 1 for _, u in results.values())
    kv = os.path.join(store[0], ".llmnode", "kv")
    assert not [f for _, _, files in os.walk(kv) for f in files if ".tmp-" in f]


def test_a_full_disk_while_saving_still_answers_and_leaves_no_partial_file(nodes, store, caplog):
    kv = os.path.join(store[0], ".llmnode", "kv")
    os.makedirs(kv, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", kv],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mounted.stderr.strip())
    try:
        with caplog.at_level(logging.WARNING):
            answer, usage = ask(nodes(), conversation())  # a state of ~9 MB: it cannot fit
        assert answer and usage.completion_tokens
        assert "was not saved" in caplog.text
        left = [f for _, _, files in os.walk(kv) for f in files if f != "kv.lock"]
        assert left == []
    finally:
        subprocess.run(["umount", kv], check=True)


def test_list_and_verify_report_the_cache_and_repair_drops_a_bad_entry(nodes, store):
    messages, before = conversation(), entry_files(store[0])
    ask(nodes(), messages)
    path = saved_entry(store[0], before)
    env = node_env(store[0], store[1])
    listed = run_cli("list", env=env)
    assert "prompt cache: %d entries" % len(entry_files(store[0])) in listed.stdout
    rot(path, n=1)
    checked = run_cli("verify", env=env)
    assert checked.returncode == 1 and "prompt cache: %d entries ok, 1 bad" % (
        len(entry_files(store[0])) - 1) in checked.stdout
    assert os.path.exists(path)  # verify reports; repair drops
    repaired = run_cli("repair", SMOL, env=env)
    assert repaired.returncode == 0 and "prompt cache: 1 bad entries dropped" in repaired.stdout
    assert not os.path.exists(path)


def ask_anthropic(node, system, question):
    """(text, usage) of a temperature-0 Messages request of 12 tokens, its states saved."""
    req = llmnode.validate_anthropic({"model": SMOL, "system": system, "max_tokens": 12, "temperature": 0,
                                      "messages": [{"role": "user", "content": question}]},
                                     node.settings.n_ctx)
    answer = node.chat(req)
    ended, _ = answer.collect()
    assert node.prompt_cache is None or node.prompt_cache.flush(60)
    return ended[0].message.content, answer.usage


def test_a_cache_control_breakpoint_saves_its_prefix_alone_and_a_new_conversation_restores_it(
        nodes, store):
    text = conversation()[0]["content"]
    system = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
    before = entry_files(store[0])
    _, usage = ask_anthropic(nodes(), system, "What is bread?")
    # One entry: the system prompt's prefix (not the whole prompt, which no breakpoint ends).
    path = saved_entry(store[0], before)
    with open(path[:-3] + ".json") as f:
        saved = len(json.load(f)["tokens"])
    assert MIN <= saved < usage.prompt_tokens - 4
    # Another conversation with the same instructions, on a restarted node, starts from it.
    answer, usage = ask_anthropic(nodes(), system, "What is cheese?")
    assert usage.cached_tokens == saved
    # Cold: nothing restored (the entry removed), read in the same two chunks (the breakpoint
    # ends one, as the prefix is saved again): llama.cpp rounds a token differently when a
    # prompt's batches are cut elsewhere, so that is the computation a restore must equal.
    for f in (path, path[:-3] + ".json"):
        os.remove(f)
    cold, cold_usage = ask_anthropic(nodes(), system, "What is cheese?")
    assert cold_usage.cached_tokens == 0 and answer == cold


def test_where_anthropic_cache_breakpoints_mark_the_conversation():
    def marks(body):
        req = llmnode.validate_anthropic(dict({"model": SMOL, "max_tokens": 1}, **body), 2048)
        return [(m.role, m.cache_mark) for m in req.messages]

    mark = {"cache_control": {"type": "ephemeral"}}
    turns = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
             {"role": "user", "content": [dict({"type": "text", "text": "three"}, **mark),
                                          {"type": "text", "text": "four"}]}]
    # a breakpoint inside a message keeps the prefix before it; on its last block, the message
    assert marks({"system": "s", "messages": turns}) == [
        ("system", False), ("user", False), ("assistant", True), ("user", False)]
    turns[2]["content"].reverse()
    assert marks({"system": "s", "messages": turns})[-1] == ("user", True)
    # on a tool: the system prompt the tools are rendered with
    tool = dict({"name": "f", "input_schema": {"type": "object"}}, **mark)
    assert marks({"system": "s", "tools": [tool], "messages": turns[:1]}) == [
        ("system", True), ("user", False)]
    assert marks({"system": [dict({"type": "text", "text": "s"}, **mark)], "messages": turns[:1]})[0] == (
        "system", True)
    # at the top level (automatic caching): the last message
    assert marks(dict({"system": "s", "messages": turns[:2]}, **mark)) == [
        ("system", False), ("user", False), ("assistant", True)]


def test_cache_marks_render_each_marked_prefix_and_take_the_last_message_as_the_whole_prompt():
    rendered = []

    def render(conversation):  # one token per character of each message's text
        rendered.append(len(conversation))
        return [ord(c) for m in conversation for c in m.content + "|"], [], ""

    messages = [llmnode.Message("system", "rules", cache_mark=True), llmnode.Message("user", "hi"),
                llmnode.Message("assistant", "yo"), llmnode.Message("user", "more", cache_mark=True)]
    prompt = render(messages)[0]
    rendered.clear()
    assert llmnode.cache_marks(messages, prompt, render) == [len("rules|"), len(prompt)]
    assert rendered == [1]  # the system prompt alone; the last message's mark is the whole prompt


def test_a_memo_makes_a_value_once_and_keeps_the_keys_used_last():
    """The node keeps the tokens of marked prefixes (and grammars) in a Memo: made once a key while
    kept, the least recently used key leaving first."""
    memo, made = llmnode.Memo(2), []

    def make(key):
        return lambda: made.append(key) or key.upper()

    assert [memo.get(k, make(k)) for k in ("a", "b", "a")] == ["A", "B", "A"]
    assert made == ["a", "b"]  # "a" asked again: kept, not made again
    memo.get("c", make("c"))  # "b" is the least recently used: it leaves
    assert memo.get("a", make("a")) == "A" and memo.get("b", make("b")) == "B"
    assert made == ["a", "b", "c", "b"]


def test_a_record_written_again_is_read_anew_by_the_next_look_up(tmp_path):
    """A look-up keeps the records it parsed while their files are unchanged; one written again
    (another node's save of the same prefix) is read anew, its new state restored, nothing lost."""
    cache, key, tokens = PromptCache(str(tmp_path), 1 << 30), {"weights": "sha256:x"}, list(range(100))
    cache.save(key, tokens, b"state one")
    assert cache.find(key, tokens + [7] * 20, 50) == (tokens, b"state one")
    PromptCache(str(tmp_path), 1 << 30).save(key, tokens, b"state two, longer")  # another node's
    assert cache.find(key, tokens + [7] * 20, 50) == (tokens, b"state two, longer")
    assert [size for _path, size in cache.entries()] == [len(b"state two, longer")]
