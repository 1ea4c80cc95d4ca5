import threading

import pytest

from repair.singleflight import Flight, SingleFlight


def test_concurrent_callers_share_one_run_and_its_result():
    release = threading.Event()
    runs = []

    def job():
        runs.append(1)
        release.wait(10)
        return "repaired"

    sf = SingleFlight()
    flights = [sf.submit("digest", job) for _ in range(20)]
    assert [started for _, started in flights].count(True) == 1
    results = []
    waiters = [threading.Thread(target=lambda f=f: results.append(f.result(10))) for f, _ in flights]
    for w in waiters:
        w.start()
    release.set()
    for w in waiters:
        w.join(10)
    assert results == ["repaired"] * 20
    assert runs == [1]


def test_every_waiter_gets_the_same_exception():
    sf = SingleFlight()
    boom = RuntimeError("registry down")

    def job():
        raise boom

    flight, _ = sf.submit("k", job)
    for _ in range(3):
        with pytest.raises(RuntimeError) as err:
            flight.result(10)
        assert err.value is boom


def test_a_finished_key_starts_a_new_run():
    sf = SingleFlight()
    first, _ = sf.submit("k", lambda: 1)
    assert first.result(10) == 1
    second, started = sf.submit("k", lambda: 2)
    assert started and second.result(10) == 2


def test_waits_have_a_deadline():
    with pytest.raises(TimeoutError):
        Flight().result(0.05)
