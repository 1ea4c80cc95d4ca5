"""Hashing beside a serving engine (repair.hashing): hashing threads run at the lowest CPU
priority, held to one core while a registered engine is busy, given their cores back after; the
digests are those of the bytes. Real threads, real syscalls, real files."""

import hashlib
import os
import threading

from repair import chunks, hashing


class Engine:
    """A registered engine whose `busy()` answers from a script, and which notes, each time the
    hashing thread asks, that thread's cores and CPU priority (what the last answer made them)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.seen = []

    def busy(self):
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.seen.append((cores, nice))
        return self.answers.pop(0) if self.answers else False


def blob(tmp_path, blocks):
    path = tmp_path / "blob"
    data = os.urandom(blocks * hashing.BLOCK)
    path.write_bytes(data)
    return path, data


def test_a_hashing_thread_holds_one_core_at_the_lowest_priority_while_the_engine_is_busy(tmp_path):
    path, data = blob(tmp_path, 3)
    allowed = os.sched_getaffinity(0)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    engine = Engine(False, True, True, False)
    hashing.register_engine(engine)
    try:
        assert hashing.sha256_file(path) == hashlib.sha256(data).hexdigest()
    finally:
        hashing._engines.discard(engine)
    # asked before each block and at the end: idle, then busy twice, then idle again
    assert [nice for _cores, nice in engine.seen] == [hashing.LOWEST_PRIORITY] * 4
    assert [cores for cores, _nice in engine.seen] == [allowed, allowed, {max(allowed)}, {max(allowed)}]
    # the caller's own thread is untouched
    assert os.sched_getaffinity(0) == allowed
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_the_chunk_check_and_the_whole_file_hash_yield_too_and_say_the_same(tmp_path):
    path, data = blob(tmp_path, 2)
    engine = Engine(*[True] * 20)
    hashing.register_engine(engine)
    try:
        whole, digests = chunks.hash_file(path)
        table = list(digests)
        table[1] = hashlib.sha256(b"other bytes").digest()
        bad = chunks.bad_chunks(path, table, len(data), workers=2)
    finally:
        hashing._engines.discard(engine)
    assert whole == hashlib.sha256(data).hexdigest()
    assert digests == [hashlib.sha256(data[i:i + chunks.CHUNK_SIZE]).digest()
                       for i in range(0, len(data), chunks.CHUNK_SIZE)]
    assert bad == [1]
    # every hashing thread that asked did so at the lowest priority; once held, on one core
    assert engine.seen and all(nice == hashing.LOWEST_PRIORITY for _c, nice in engine.seen)
    allowed = os.sched_getaffinity(0)
    assert {frozenset(cores) for cores, _n in engine.seen} <= {frozenset(allowed), frozenset({max(allowed)})}
    assert frozenset({max(allowed)}) in {frozenset(cores) for cores, _n in engine.seen}



def test_a_hashing_thread_started_by_a_held_one_gets_every_core_once_the_engine_is_idle(tmp_path):
    """The whole-file hash starts its chunk hasher after it has been held to one core; the chunk
    hasher inherits that core, and must not take it for all it may use."""
    path, data = blob(tmp_path, 3)
    allowed = os.sched_getaffinity(0)
    assert len(allowed) > 1  # else one core is every core

    class Seen(Engine):
        def busy(self):
            self.seen.append((threading.current_thread().name, os.sched_getaffinity(0)))
            return self.answers.pop(0) if self.answers else False

    engine = Seen(True)  # busy when the first block is read, idle after
    hashing.register_engine(engine)
    try:
        whole, _digests = chunks.hash_file(path)
    finally:
        hashing._engines.discard(engine)
    assert whole == hashlib.sha256(data).hexdigest()
    chunk_hasher = [cores for name, cores in engine.seen if name == "chunk-hasher"]
    assert len(chunk_hasher) == 3 and chunk_hasher[0] == {max(allowed)}  # started held: inherited
    assert chunk_hasher[1:] == [allowed, allowed]  # and set to every core at its first check


def test_hashing_works_where_the_os_has_no_cpu_affinity(tmp_path, monkeypatch):
    """macOS has no sched_getaffinity: the hashing threads keep their cores and still hash."""
    path, data = blob(tmp_path, 2)
    monkeypatch.delattr(os, "sched_getaffinity")
    engine = Engine(True, True, True, True)
    hashing.register_engine(engine)
    try:
        assert hashing.sha256_file(path) == hashlib.sha256(data).hexdigest()
        assert chunks.hash_file(path)[0] == hashlib.sha256(data).hexdigest()
    finally:
        hashing._engines.discard(engine)
