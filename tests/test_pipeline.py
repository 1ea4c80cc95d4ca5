"""The byte pipeline fed plain lists of bytes, no HTTP: the registry client's one checked
iterator (short bodies, extra bytes, wrong ranges, ignored ranges, dropped connections), the
range writer (ENOSPC on a real /dev/full) and the deadline."""

import os

import pytest
import requests

from repair import names
from repair.download import until, write_range
from repair.errors import BadRange, DownloadError, InsufficientStorage, NetworkError, RepairTimeout
from repair.registry import RangesUnsupported, RegistryClient

REF = names.parse("gpt-oss:7b")
DIGEST = "sha256:" + "a" * 64
DATA = bytes(range(256)) * 40  # 10240 bytes


class Body:
    """A response whose body is a plain list of byte strings (or an exception to raise)."""

    def __init__(self, status, pieces, headers=None):
        self.status_code, self.pieces = status, pieces
        self.headers = headers or {}
        self.is_redirect = False
        self.url = "http://registry/blob"
        self.closed = False

    def iter_content(self, _size):
        for piece in self.pieces:
            if isinstance(piece, Exception):
                raise piece
            yield piece

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Session:
    """Answers each GET with the next prepared Body; records the Range asked for."""

    def __init__(self, *bodies):
        self.bodies = list(bodies)
        self.headers = {}
        self.ranges = []

    def get(self, url, headers=None, **_kwargs):
        self.ranges.append((headers or {}).get("Range"))
        return self.bodies.pop(0)


def read(session, **kwargs):
    client = RegistryClient("http://registry", session=session)
    return b"".join(client.blob_bytes(REF, DIGEST, **kwargs))


def test_a_whole_blob_in_pieces():
    s = Session(Body(200, [DATA[:100], DATA[100:5000], DATA[5000:]]))
    assert read(s, total=len(DATA)) == DATA
    assert s.ranges == [None]


def test_a_range_is_asked_for_and_its_content_range_checked():
    s = Session(Body(206, [DATA[100:200]], {"Content-Range": "bytes 100-199/%d" % len(DATA)}))
    assert read(s, start=100, end=199) == DATA[100:200]
    assert s.ranges == ["bytes=100-199"]


def test_a_resume_asks_for_the_rest():
    s = Session(Body(206, [DATA[4000:]], {"Content-Range": "bytes 4000-%d/%d" % (len(DATA) - 1, len(DATA))}))
    assert read(s, start=4000, total=len(DATA)) == DATA[4000:]
    assert s.ranges == ["bytes=4000-"]


def test_a_short_body_is_a_network_error_naming_the_byte():
    with pytest.raises(NetworkError, match="ended at byte 5000 of 10240"):
        read(Session(Body(200, [DATA[:5000]])), total=len(DATA))


def test_extra_bytes_are_refused_before_they_are_handed_on():
    pieces = []
    client = RegistryClient("http://registry", session=Session(Body(200, [DATA, b"more"])))
    with pytest.raises(DownloadError, match="more than the 10240 bytes"):
        for piece in client.blob_bytes(REF, DIGEST, total=len(DATA)):
            pieces.append(piece)
    assert b"".join(pieces) == DATA


@pytest.mark.parametrize("header", ["bytes 110-199/10240", "bytes 100-150/10240", "", "garbage"])
def test_a_wrong_content_range_is_a_bad_range(header):
    with pytest.raises(BadRange):
        read(Session(Body(206, [DATA[100:200]], {"Content-Range": header})), start=100, end=199)


def test_an_ignored_range_skips_the_prefix_or_says_so():
    assert read(Session(Body(200, [DATA[:3000], DATA[3000:]])), start=4000, total=len(DATA),
                whole_ok=True) == DATA[4000:]
    with pytest.raises(RangesUnsupported):
        read(Session(Body(200, [DATA])), start=100, end=199)


def test_a_dropped_connection_is_a_network_error_and_the_response_is_closed():
    body = Body(200, [DATA[:10], requests.ConnectionError("reset by peer")])
    with pytest.raises(NetworkError, match="at byte 10: reset by peer"):
        read(Session(body), total=len(DATA))
    assert body.closed


def test_ranges_land_at_their_offsets(tmp_path):
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    counted = []
    try:
        assert write_range(fd, [DATA[6000:8000], DATA[8000:]], 6000, counted.append) == len(DATA)
        assert write_range(fd, [DATA[:3000], DATA[3000:6000]], 0, counted.append) == 6000
    finally:
        os.close(fd)
    assert (tmp_path / "partial").read_bytes() == DATA
    assert sum(map(len, counted)) == len(DATA)


def test_a_full_disk_is_insufficient_storage():
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(InsufficientStorage):
            write_range(fd, [DATA], 0, lambda chunk: None)
    finally:
        os.close(fd)


def test_the_deadline_ends_the_stream_after_the_chunk_in_hand():
    now = [0.0]
    seen = []
    with pytest.raises(RepairTimeout):
        for chunk in until(iter([b"a", b"b", b"c"]), deadline=1.0, clock=lambda: now[0]):
            seen.append(chunk)
            if chunk == b"b":
                now[0] = 2.0
    assert seen == [b"a", b"b"]
