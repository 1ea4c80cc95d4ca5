"""Cross-process locks on the store: `flock` on a lock file, waited for with a deadline.

flock locks belong to an open file description, so two threads of one process that each
open the lock file exclude each other just as two processes do; the kernel drops the lock
when its holder dies, so a SIGKILLed writer never leaves the store locked.
"""

import fcntl
import os
import time

from repair.errors import RepairTimeout

# How often a waiter tries again: flock has no timed wait, and a writer holds its lock for
# a whole download, so 50 ms costs nothing against the work waited for.
POLL_SECS = 0.05


class FileLock:
    """An exclusive lock on `path` (created if missing); `acquire` waits until `deadline`."""

    def __init__(self, path, clock=time.monotonic):
        self.path = path
        self.clock = clock
        self._fd = None
        self.waited = False  # whether another holder made this one wait

    def acquire(self, deadline=None, on_wait=None):
        """Take the lock; `on_wait()` runs once if another holder makes this one wait."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not self.waited and on_wait is not None:
                        on_wait()
                    self.waited = True
                    if deadline is not None and self.clock() + POLL_SECS > deadline:
                        raise RepairTimeout() from None
                    time.sleep(POLL_SECS)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
