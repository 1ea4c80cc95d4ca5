"""A retry policy as a small value: attempts left and how long to back off, testable without I/O."""

import email.utils
import time
from dataclasses import dataclass, replace

from repair.errors import BadRange, DigestMismatch, NetworkError, RegistryHTTPError


@dataclass(frozen=True)
class Retry:
    total: int = 5
    backoff_factor: float = 0.5
    backoff_max: float = 30.0
    attempt: int = 0

    @property
    def exhausted(self):
        return self.attempt >= self.total

    def increment(self):
        """The policy after one more failed attempt."""
        return replace(self, attempt=self.attempt + 1)

    def backoff(self, retry_after=None):
        """Seconds to wait before the next attempt; the server's Retry-After wins if given."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max)
        if self.attempt <= 1:
            return 0.0
        return min(self.backoff_factor * (2 ** (self.attempt - 1)), self.backoff_max)


def parse_retry_after(value, now=None):
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(when.timestamp() - now, 0.0)


def is_retryable(exc):
    """Whether a download error may pass: a network fault, bytes that came wrong (the next try
    starts clean), a 5xx or a 429."""
    if isinstance(exc, (NetworkError, DigestMismatch, BadRange)):
        return True
    if isinstance(exc, RegistryHTTPError):
        return exc.status_code >= 500 or exc.status_code == 429
    return False


def call_with_retries(attempt, policy=None, sleep=time.sleep, on_retry=None):
    """Run `attempt()` until it succeeds, fails for good, or the policy runs out."""
    policy = policy or Retry()
    while True:
        try:
            return attempt()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            policy = policy.increment()
            if policy.exhausted:
                raise
            delay = policy.backoff(getattr(exc, "server_retry_after", None))
            if on_retry:
                on_retry(exc, policy, delay)
            sleep(delay)
