"""Hashing the store's bytes beside a serving engine: verify, scrub and repair hash on threads of
the lowest CPU priority, held to one core while an engine in the process has sequences running, so
they take only what the engine leaves; on an idle node they use every core the process may.

Measured before this (SmolLM2, 2 cores): a verify hashing on every core made a 512-token prefill
4x slower. A nice value only matters when threads compete for a core, so the lowest priority costs
an idle node nothing; the one-core hold keeps a chunk check's pool from spreading over the cores
the engine's threads spin on. The engine registers itself (`register_engine`) with anything that
has a `busy()`; nothing here imports the node."""

import hashlib
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

LOWEST_PRIORITY = 19
BLOCK = 8 << 20  # bytes read (and the engine asked about) at a time

# The engines of this process (a node's compute thread); weak, so a closed node drops out.
_engines = weakref.WeakSet()


def register_engine(engine):
    """`engine.busy()` says whether it has sequences running; hashing yields while any does."""
    _engines.add(engine)


def engine_busy():
    """Whether any registered engine is busy (each is asked: a glance costs a list's length)."""
    return any([engine.busy() for engine in list(_engines)])


def lower_priority():
    """Make the calling thread, one that only hashes, the lowest CPU priority (per thread on
    Linux; threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)
    except OSError:
        pass


def process_cores():
    """The cores this process may use (the main thread's: a hashing thread may have started
    while another was held to one core, and inherited that); None where the OS has no
    affinity (macOS)."""
    try:
        return os.sched_getaffinity(os.getpid())
    except (AttributeError, OSError):
        return None


class Cores:
    """A hashing thread's cores: one while an engine is busy, every allowed one otherwise.
    `check()` before each block (the first sets them, whatever the thread inherited);
    `release()` gives the thread its cores back."""

    def __init__(self):
        self.allowed = process_cores()
        self.held = None  # not set yet

    def check(self):
        busy = engine_busy()
        if busy is not self.held and self.allowed is not None:
            self._set({max(self.allowed)} if busy else self.allowed)
            self.held = busy

    def release(self):
        if self.held:
            self._set(self.allowed)
            self.held = False

    @staticmethod
    def _set(cores):
        try:
            os.sched_setaffinity(0, cores)  # 0: the calling thread
        except OSError:
            pass


def pool(workers):
    """A thread pool of hashing threads (the lowest priority)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="hash", initializer=lower_priority)


def run(fn, *args):
    """fn(*args) on a fresh hashing thread, the caller waiting for its result (or exception)."""
    with pool(1) as one:
        return one.submit(fn, *args).result()


def read_blocks(path, block=BLOCK):
    """The file's bytes in blocks, the engine asked before each: for hashing threads. Each block
    is a view of one buffer, read into again for the next (copy what must outlive it)."""
    cores = Cores()
    buf = bytearray(block)
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                cores.check()
                n = f.readinto(buf)
                if not n:
                    return
                yield memoryview(buf)[:n]
    finally:
        cores.release()


def sha256_file(path):
    """Hex sha256 of a file, hashed on a hashing thread."""

    def digest():
        h = hashlib.sha256()
        for data in read_blocks(path):
            h.update(data)
        return h.hexdigest()

    return run(digest)
