import pytest

from repair.errors import BadRange, DigestMismatch, NetworkError, RegistryHTTPError
from repair.retry import Retry, call_with_retries, is_retryable, parse_retry_after


def test_backoff_grows_and_is_capped():
    r = Retry(total=10, backoff_factor=1, backoff_max=5)
    delays = []
    for _ in range(6):
        r = r.increment()
        delays.append(r.backoff())
    assert delays == [0, 2, 4, 5, 5, 5]


def test_retry_after_wins_but_is_capped():
    r = Retry(backoff_max=30).increment()
    assert r.backoff(retry_after=7) == 7
    assert r.backoff(retry_after=3600) == 30


def test_policy_runs_out():
    r = Retry(total=2)
    assert not r.exhausted
    assert r.increment().increment().exhausted


def test_retry_after_header_forms():
    assert parse_retry_after("12") == 12
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480) == 10
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize("exc, retryable", [
    (NetworkError("reset"), True),
    (RegistryHTTPError(503, "u"), True),
    (RegistryHTTPError(429, "u"), True),
    (RegistryHTTPError(404, "u"), False),
    (RegistryHTTPError(401, "u"), False),
    (DigestMismatch("sha256:" + "0" * 64, "1" * 64), True),
    (BadRange("bytes 10-"), True),
])
def test_what_is_transient(exc, retryable):
    assert is_retryable(exc) is retryable


def test_call_with_retries_sleeps_as_the_server_asks_then_succeeds():
    sleeps, outcomes = [], [RegistryHTTPError(429, "u"), NetworkError("x"), "ok"]
    outcomes[0].server_retry_after = 3.0

    def attempt():
        o = outcomes.pop(0)
        if isinstance(o, Exception):
            raise o
        return o

    assert call_with_retries(attempt, Retry(total=5, backoff_factor=1), sleeps.append) == "ok"
    assert sleeps == [3.0, 2]


def test_call_with_retries_gives_up_on_permanent_errors_at_once():
    calls = []

    def attempt():
        calls.append(1)
        raise RegistryHTTPError(404, "u")

    with pytest.raises(RegistryHTTPError):
        call_with_retries(attempt, Retry(total=5), lambda s: None)
    assert len(calls) == 1
