"""read_ahead: the as-received download decodes the next frame on its own thread while
the previous one is sent. Same bytes in the same order, errors surface, a consumer that
stops early stops the producer."""

import threading
import time

import pytest

from service.downloads import read_ahead


def test_same_pieces_in_order_and_bounded():
    produced = []

    def source():
        for i in range(40):
            piece = bytes([i]) * ((1 << 20) + i)
            produced.append(i)
            yield piece
    out = read_ahead(source(), limit=4 << 20)
    first = next(out)
    time.sleep(0.2)  # the producer runs ahead, but only about the limit
    assert 2 <= len(produced) <= 7
    rest = list(out)
    assert [p[0] for p in [first, *rest]] == list(range(40))
    assert [len(p) for p in [first, *rest]] == [(1 << 20) + i for i in range(40)]


def test_an_error_in_the_producer_reaches_the_consumer():
    def source():
        yield b"a"
        raise ValueError("chunk 2 is corrupt")
    out = read_ahead(source())
    assert next(out) == b"a"
    with pytest.raises(ValueError, match="corrupt"):
        next(out)


def test_closing_early_stops_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            while True:
                yield b"x" * (1 << 20)
        finally:
            closed.set()
    out = read_ahead(source(), limit=2 << 20)
    next(out)
    out.close()
    assert closed.wait(5)


def test_a_piece_larger_than_the_limit_still_goes_through():
    big = b"h" * (3 << 20)  # e.g. a 3 MiB extended header in one piece

    def source():
        yield big
        yield b"frame"
    assert list(read_ahead(source(), limit=1 << 20)) == [big, b"frame"]
