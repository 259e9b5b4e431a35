"""The event loop first.

Ingest work runs nicer than the requests (service/priority.py): an upload's stream work
and every thread it starts, and the job workers, at the process's nice value plus
``work_nice``; the event loop and the request threads at the process's own. Read from
``/proc/<pid>/task/<tid>/stat``, the kernel's account, not from the service. And the
loop does not copy request bodies (service/api/transport.py)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.priority import WorkThreads
from tests.api_helpers import start_server
from tests.reference import counting_movie, write_raw_mrc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="threads have nice values of their own on Linux")


def nice_of(tid: int, pid: str = "self") -> int:
    """Field 19 of the thread's stat line (the fields after the command's ')' start at 3)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def me() -> int:
    return threading.get_native_id()


def test_work_threads_and_the_threads_they_start_run_nicer():
    base = nice_of(me())
    work = WorkThreads(5)

    def inside() -> tuple[int, int, int]:
        child: dict[str, int] = {}
        started = threading.Thread(target=lambda: child.update(nice=nice_of(me())))
        started.start()
        started.join()
        return me(), nice_of(me()), child["nice"]

    try:
        tid, nice, child = work.run(inside)
        with pytest.raises(ZeroDivisionError):  # the work's exception reaches the caller
            work.run(lambda: 1 / 0)
    finally:
        work.shutdown()
    assert tid != me()
    assert nice == child == min(19, base + 5)
    assert nice_of(me()) == base  # the caller keeps its own priority


def test_no_steps_run_the_work_on_the_callers_thread():
    work = WorkThreads(0)
    assert work.wrap(lambda: (me(), nice_of(me())))() == (me(), nice_of(me()))


def niced_threads(pid: int) -> dict[int, int]:
    """tid -> nice of every thread of ``pid`` whose nice is not the process's."""
    main = nice_of(pid, str(pid))
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            nice = nice_of(int(task.name), str(pid))
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        if nice != main:
            found[int(task.name)] = nice
    return found


@pytest.mark.parametrize("work_nice", [10, 0])
def test_a_streaming_upload_is_ingested_below_the_event_loop(tmp_path, work_nice):
    movie = tmp_path / "movie.mrc"
    # over two of the 4 MiB batches the stream work takes at a time
    write_raw_mrc(movie, counting_movie((12, 1024, 2048)), 101)
    raw = movie.read_bytes()
    proc, base = start_server(tmp_path / "data", env={"MRC_INGEST_WORK_NICE": str(work_nice)})
    try:
        idle = niced_threads(proc.pid)
        sent_half = threading.Event()

        def body():
            for start in range(0, len(raw), 256 << 10):
                yield raw[start:start + (256 << 10)]
                if start >= len(raw) // 2:
                    sent_half.set()
                    time.sleep(0.02)  # a slow link: the pass stays in flight a while

        answers: list[httpx.Response] = []
        client = threading.Thread(target=lambda: answers.append(httpx.put(
            f"{base}/v1/uploads/movie.mrc", content=body(), timeout=60)))
        client.start()
        assert sent_half.wait(30)
        time.sleep(0.2)
        streaming = niced_threads(proc.pid)
        client.join(60)
        assert answers and answers[0].status_code == 201, answers
        assert nice_of(proc.pid, str(proc.pid)) == 0  # the event loop: the process's
        if work_nice:
            # the job workers wait at 10 from the start; the upload's work thread, its
            # receiver and the archive's encoder join them while it streams
            assert idle and set(idle.values()) == {10}
            assert set(streaming.values()) == {10} and len(streaming) > len(idle)
        else:
            assert idle == streaming == {}
    finally:
        proc.terminate()
        proc.wait(30)


# -- the request body as the chunks that arrived (service/api/transport.py) -----------

def test_a_body_of_one_chunk_reaches_the_application_uncopied():
    from service.api.transport import Chunks

    chunk = b"x" * 70_000
    body = Chunks()
    body += chunk
    assert len(body) == 70_000 and bytes(body) is chunk
    body += b""
    body += bytearray(b"yz")  # not bytes: copied once, kept
    assert len(body) == 70_002 and bytes(body) == chunk + b"yz"
    assert bytes(Chunks(b"ab")) == b"ab" and bytes(Chunks()) == b"" and len(Chunks()) == 0


def test_serve_receives_bodies_in_any_pieces_byte_exact(tmp_path):
    """A real ``serve`` (which runs the chunk-keeping protocol): bodies sent in pieces of
    1 byte to 1 MiB, with and without a Content-Length, arrive whole."""
    import hashlib

    movie = tmp_path / "movie.mrc"
    write_raw_mrc(movie, counting_movie((6, 300, 401)), 101)
    raw = movie.read_bytes()
    proc, base = start_server(tmp_path / "data")
    try:
        for i, piece in enumerate((1, 4093, 65536, 1 << 20)):
            def body(piece=piece):
                for start in range(0, len(raw), piece):
                    yield raw[start:start + piece]
            # odd: chunked transfer encoding, the client's digest checked; even: a length
            answer = httpx.put(f"{base}/v1/uploads/m{i}.mrc", content=body(), timeout=60,
                               headers={"X-Content-SHA256": hashlib.sha256(raw).hexdigest()}
                               if i % 2 else {"Content-Length": str(len(raw))})
            assert answer.status_code in (200, 201), answer.text
            assert answer.json()["dataset"]["sha256"] == hashlib.sha256(raw).hexdigest()
    finally:
        proc.terminate()
        proc.wait(30)
