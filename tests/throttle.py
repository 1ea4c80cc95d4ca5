"""A TCP proxy on loopback that caps each connection's download rate (as CDNs do) or the rate
of all connections together (a slow link), and counts the bytes it passes back."""

import socket
import threading
import time


class ThrottlingProxy:
    def __init__(self, upstream_port, bytes_per_sec=None, link_bytes_per_sec=None):
        self.upstream_port = upstream_port
        self.rate = bytes_per_sec
        self.link_rate = link_bytes_per_sec
        # Guards bytes_down and _link_free (when the shared link has sent all it was given).
        self._lock = threading.Lock()
        self.bytes_down = 0
        self._link_free = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, downstream):
        started, sent = time.monotonic(), 0
        try:
            while True:
                data = src.recv(256 << 10)
                if not data:
                    break
                dst.sendall(data)
                if downstream:
                    with self._lock:
                        self.bytes_down += len(data)
                        if self.link_rate:
                            now = time.monotonic()
                            self._link_free = max(now, self._link_free) + len(data) / self.link_rate
                            wait = self._link_free - now
                    if self.link_rate and wait > 0:
                        time.sleep(wait)
                    sent += len(data)
                    if self.rate:
                        ahead = sent / self.rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._listener.close()
