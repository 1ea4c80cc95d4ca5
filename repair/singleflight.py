"""Single-flight: one run of a job per key, however many callers wait; all get its outcome."""

import threading
import time

PENDING, FINISHED = "pending", "finished"


class Flight:
    """One run's outcome, handed to every waiter (the shape of concurrent.futures.Future)."""

    def __init__(self):
        # Guards _state, _result and _exception; notified once when the run finishes.
        self._cond = threading.Condition()
        self._state = PENDING
        self._result = None
        self._exception = None

    def finish(self, result=None, exception=None):
        with self._cond:
            self._result, self._exception, self._state = result, exception, FINISHED
            self._cond.notify_all()

    def result(self, timeout, clock=time.monotonic):
        """The run's result, or its exception raised; TimeoutError past `timeout` seconds."""
        deadline = clock() + timeout
        with self._cond:
            while self._state != FINISHED:
                left = deadline - clock()
                if left <= 0:
                    raise TimeoutError()
                self._cond.wait(left)
            if self._exception is not None:
                raise self._exception
            return self._result


class SingleFlight:
    """Runs `job()` in its own thread once per key; callers that arrive meanwhile join it."""

    def __init__(self, name="flight"):
        self.name = name
        # Guards _flights (key -> Flight still running).
        self._lock = threading.Lock()
        self._flights = {}

    def submit(self, key, job):
        """The running Flight for `key`, starting `job` if there is none; (flight, started)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Flight()
        threading.Thread(target=self._run, args=(key, flight, job), daemon=True,
                         name="%s-%s" % (self.name, key)).start()
        return flight, True

    def _run(self, key, flight, job):
        try:
            result, exception = job(), None
        except BaseException as e:
            result, exception = None, e
        with self._lock:
            del self._flights[key]
        flight.finish(result, exception)
