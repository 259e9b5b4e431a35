"""A one-request upload's bytes have no scratch copy: the ingest pass is their only
keeper (issue #19). Whatever the outcome, what the pass stored must give back the bytes
received, byte for byte: the archive + record + tail; the file as received, written
whole as it streamed; or the file rebuilt at the end from the proven chunks and the
tail (:class:`~service.mrc.restore.Carrier`).

The reference is the input itself: each case streams a file through the cutter and the
archiver (in uneven pieces, as a network delivers them) and compares what it stored
with the bytes it was fed. Then the same through the service: a PUT that cannot become
an archive is kept exactly, nothing ever lands in the scratch folder, and the objects
an original was rebuilt from are gone once the dataset is committed.
"""

from __future__ import annotations

from pathlib import Path

import mrcz
import numpy as np
import pytest

from service.arrival.ingest_pass import IngestPass
from service.mrc import MrcFile, restore as restore_mod
from service.mrc.archiver import FORM_ARCHIVE, FORM_ORIGINAL, Archiver, ArchivePolicy
from service.mrc.codec import Codec
from service.mrc.restore import AsReceived, RestoreRecord
from service.mrc.sink import AtomicFile
from service.mrc.stream import StreamCutter
from tests.api_helpers import assert_consistent, files_under, make_client
from tests.reference import counting_movie, write_raw_mrc
from tests.test_restore import feed_in_pieces


class Kept:
    """The objects one pass wrote into ``folder``, and the bytes they give back."""

    def __init__(self, folder: Path):
        self.archive, self.tail = folder / "archive.mrcz", folder / "tail.bin"
        self.original = folder / "original.mrc"

    def stored_bytes(self, outcome) -> bytes:
        """The file as received, from whatever the outcome says holds it."""
        if outcome.form == FORM_ARCHIVE:
            record = RestoreRecord.from_bytes(outcome.record)
            movie = MrcFile(self.archive, frame_index=record.frame_index)
            rebuilt = AsReceived(record, movie.read_frame, self._read_tail(),
                                 archive_frame_nbytes=movie.layout.frame_nbytes)
            return b"".join(rebuilt.iter_range())
        if outcome.original:
            assert outcome.carrier is None
            return self.original.read_bytes()
        assert outcome.carrier is not None, outcome.reason
        archive = self.archive.read_bytes()
        rebuilt = outcome.carrier.as_received(lambda off, n: archive[off:off + n],
                                              self._read_tail())
        return b"".join(rebuilt.iter_range(block=1000))  # many small pieces

    def _read_tail(self):
        if not self.tail.exists():
            return None
        data = self.tail.read_bytes()
        return lambda off, n: data[off:off + n]


def keep_through(raw: bytes, folder: Path, policy: ArchivePolicy = ArchivePolicy(),
                 pieces: int = 9, seed: int = 1):
    """Feed ``raw`` through cutter + an archiver that keeps the bytes; (outcome, Kept)."""
    kept = Kept(folder)
    archiver = Archiver(policy, lambda: AtomicFile(kept.archive, reserve_head=1024),
                        lambda: AtomicFile(kept.tail),
                        open_original=lambda: AtomicFile(kept.original))
    return feed_in_pieces(raw, archiver, pieces, seed), kept


def fail_proof_at(monkeypatch, frame: int) -> None:
    """The proof's rebuild of ``frame`` (and of no other) gives one wrong byte."""
    real = restore_mod.restore_frame
    calls = {"n": 0}

    def wrong_once(values, source, padding=None, out=None):
        rebuilt = real(values, source, padding, out)
        calls["n"] += 1
        if calls["n"] - 1 == frame:
            rebuilt = rebuilt.copy()
            rebuilt[7] ^= 0x10
        return rebuilt
    monkeypatch.setattr("service.mrc.archiver.restore_frame", wrong_once)


def odd_4bit(tmp_path: Path, nz: int = 6) -> bytes:
    """A 4-bit movie of odd width (each row ends in a padding nibble) and an extended
    header."""
    return write_raw_mrc(tmp_path / "odd.mrc", counting_movie((nz, 96, 129)), 101,
                         extended=bytes(range(160)), exttyp=b"SERI").read_bytes()


def int16_with_trailing_bytes(tmp_path: Path) -> bytes:
    data = (np.arange(5 * 80 * 60) % 300).astype(np.int16).reshape(5, 80, 60)
    return write_raw_mrc(tmp_path / "s.mrc", data, 1, order=">").read_bytes() + \
        b"bytes a writer left after the last frame" * 3


# -- the core: every outcome keeps every byte -----------------------------------------

def test_a_proven_archive_keeps_no_other_copy(tmp_path):
    raw = odd_4bit(tmp_path)
    outcome, kept = keep_through(raw, tmp_path)
    assert outcome.form == FORM_ARCHIVE and not outcome.original and outcome.carrier is None
    assert not kept.original.exists() and not kept.tail.exists()
    assert kept.stored_bytes(outcome) == raw


def test_keep_original_writes_the_file_whole_beside_the_archive(tmp_path):
    raw = int16_with_trailing_bytes(tmp_path)
    outcome, kept = keep_through(raw, tmp_path, ArchivePolicy(keep_original=True))
    assert outcome.form == FORM_ARCHIVE and outcome.original
    assert kept.original.read_bytes() == raw and kept.stored_bytes(outcome) == raw
    assert kept.tail.read_bytes() == raw[-120:]  # the archive still has its own tail


@pytest.mark.parametrize("frame", [0, 2, -1])
@pytest.mark.parametrize("movie", ["odd_4bit", "int16_with_trailing_bytes"])
def test_a_failed_proof_sends_the_frames_from_there_to_the_tail(tmp_path, monkeypatch,
                                                                 frame, movie):
    """Frame 0, one in the middle, and the last (of a movie that ends there, and of one
    with bytes after it)."""
    raw = {"odd_4bit": odd_4bit, "int16_with_trailing_bytes": int16_with_trailing_bytes}[
        movie](tmp_path)
    frame = frame % {"odd_4bit": 6, "int16_with_trailing_bytes": 5}[movie]
    fail_proof_at(monkeypatch, frame)
    outcome, kept = keep_through(raw, tmp_path)
    assert outcome.form == FORM_ORIGINAL and not outcome.original
    assert outcome.reason.startswith(f"restore not proven: frame {frame}")
    record = outcome.carrier.record
    assert record.frames == frame and record.tail_offset + record.tail_size == len(raw)
    assert kept.tail.stat().st_size == len(raw) - record.tail_offset
    assert kept.stored_bytes(outcome) == raw
    assert not kept.original.exists()


def test_a_chunk_that_does_not_decompress_goes_raw_from_its_frame(tmp_path, monkeypatch):
    from service.mrc import archiver as archiver_mod
    real, calls = archiver_mod.decompress_into, {"n": 0}

    def refuses_the_third(chunk, out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("chunk refused")
        real(chunk, out)
    monkeypatch.setattr(archiver_mod, "decompress_into", refuses_the_third)
    raw = odd_4bit(tmp_path)
    outcome, kept = keep_through(raw, tmp_path)
    assert outcome.reason.startswith("restore not proven: frame 2: the archive chunk does "
                                     "not decompress")
    assert outcome.carrier.record.frames == 2
    monkeypatch.undo()  # the rebuild decompresses the two proven chunks for real
    assert kept.stored_bytes(outcome) == raw


def test_frames_over_the_size_limit_are_kept_whole_without_an_archive(tmp_path,
                                                                       monkeypatch):
    for module in ("service.mrc.stream", "service.mrc.archiver"):
        monkeypatch.setattr(f"{module}.MAX_FRAME_BYTES", 1000)
    raw = odd_4bit(tmp_path)
    outcome, kept = keep_through(raw, tmp_path)
    assert not outcome.valid and outcome.original
    assert not kept.archive.exists() and kept.stored_bytes(outcome) == raw


def test_a_keeper_without_a_tail_is_refused():
    with pytest.raises(ValueError, match="needs a tail"):
        Archiver(ArchivePolicy(), lambda: None, None, open_original=lambda: None)


def test_a_truncated_movie_is_kept_from_its_complete_frames_and_the_rest(tmp_path):
    whole = odd_4bit(tmp_path)
    frame_nbytes = 96 * 65
    raw = whole[:len(whole) - 2 * frame_nbytes - 5]  # ends inside frame 3
    outcome, kept = keep_through(raw, tmp_path)
    assert outcome.form == FORM_ORIGINAL and not outcome.valid
    assert outcome.carrier.record.frames == 3
    assert kept.stored_bytes(outcome) == raw


def test_data_that_do_not_compress_are_rebuilt_from_their_chunks(tmp_path):
    noise = np.random.default_rng(9).integers(0, 2**32, size=(4, 64, 64), dtype=np.uint32)
    raw = write_raw_mrc(tmp_path / "n.mrc", noise.view(np.float32), 2).read_bytes()
    outcome, kept = keep_through(raw, tmp_path)
    assert outcome.form == FORM_ORIGINAL and "would not be smaller" in outcome.reason
    assert outcome.carrier.record.frames == 4 and kept.stored_bytes(outcome) == raw


def test_an_mrcz_upload_is_written_whole_as_it_streams(tmp_path):
    mrcz.writeMRC(counting_movie((3, 20, 20)).astype(np.int8), str(tmp_path / "in.mrcz"),
                  compressor="zstd", clevel=1)
    raw = (tmp_path / "in.mrcz").read_bytes()
    outcome, kept = keep_through(raw, tmp_path)
    assert outcome.form == FORM_ORIGINAL and outcome.original and outcome.valid
    assert not kept.archive.exists() and not kept.tail.exists()
    assert kept.stored_bytes(outcome) == raw


def test_no_archive_codec_writes_the_file_whole(tmp_path):
    raw = odd_4bit(tmp_path)
    outcome, kept = keep_through(raw, tmp_path, ArchivePolicy(codec=Codec.NONE))
    assert outcome.original and kept.stored_bytes(outcome) == raw
    assert not kept.archive.exists()


@pytest.mark.parametrize("cut", [1024, 1024 + 100])
def test_a_stream_that_ends_before_its_extended_header_does(tmp_path, cut):
    raw = odd_4bit(tmp_path)[:cut]
    outcome, kept = keep_through(raw, tmp_path)
    assert not outcome.valid and outcome.original
    assert kept.stored_bytes(outcome) == raw


def test_an_extended_header_over_the_limit_keeps_the_file_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("service.mrc.stream.MAX_EXTENDED_BYTES", 100)
    raw = odd_4bit(tmp_path)
    outcome, kept = keep_through(raw, tmp_path)
    assert not outcome.valid and outcome.original
    assert kept.stored_bytes(outcome) == raw


def test_an_aborted_pass_leaves_nothing(tmp_path):
    raw = odd_4bit(tmp_path)
    kept = Kept(tmp_path)
    archiver = Archiver(ArchivePolicy(keep_original=True),
                        lambda: AtomicFile(kept.archive, reserve_head=1024),
                        lambda: AtomicFile(kept.tail),
                        open_original=lambda: AtomicFile(kept.original))
    cutter = StreamCutter(pool=archiver.pool)
    for piece in cutter.feed(raw[:len(raw) // 2]):
        archiver.add(piece)
    archiver.abort()
    assert list(tmp_path.iterdir()) == [tmp_path / "odd.mrc"]


# -- the service: a PUT's bytes never touch the scratch folder ---------------------------

def nothing_in_incoming_when_all_bytes_are_in(monkeypatch, data_dir: Path) -> list:
    """Look at the scratch folder at the moment every byte of an upload has arrived
    (the pass's finish begins): the scratch copy used to lie there, whole."""
    seen: list = []
    real = IngestPass.finish

    def finish(self, sha256):
        seen.append(files_under(data_dir / "incoming"))
        return real(self, sha256)
    monkeypatch.setattr(IngestPass, "finish", finish)
    return seen


def test_a_put_the_archive_cannot_hold_is_kept_exactly(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    seen = nothing_in_incoming_when_all_bytes_are_in(monkeypatch, data_dir)
    fail_proof_at(monkeypatch, 2)
    raw = odd_4bit(tmp_path)
    with make_client(data_dir) as c:
        ds = c.put("/v1/uploads/m.mrc", content=raw).json()["dataset"]
        detail = c.get(f"/v1/datasets/{ds['id']}").json()
        assert detail["status"] == "ready" and detail["archive"]["restorable"] is False
        assert detail["archive"]["reason"].startswith("restore not proven: frame 2")
        # the chunks and tail the original was rebuilt from are gone
        stored = sorted(p.relative_to(data_dir / "datasets" / ds["id"]).parts[1:]
                        for p in files_under(data_dir / "datasets" / ds["id"]))
        assert stored == [("original", "m.mrc"), ("sum.bin",)]
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == raw
        assert c.get(f"/v1/datasets/{ds['id']}/frames/4.png").status_code == 200
    assert seen == [[]]
    assert_consistent(data_dir)


def test_a_truncated_put_is_rejected_and_kept_exactly(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    seen = nothing_in_incoming_when_all_bytes_are_in(monkeypatch, data_dir)
    raw = odd_4bit(tmp_path)[:-1000]
    with make_client(data_dir) as c:
        body = c.put("/v1/uploads/t.mrc", content=raw).json()
        ds = c.get(f"/v1/datasets/{body['dataset']['id']}").json()
        assert ds["status"] == "rejected" and ds["storage"]["form"] == "original"
        assert any("truncated" in f["message"] for f in ds["findings"])
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == raw
    assert seen == [[]]
    assert_consistent(data_dir)


@pytest.mark.parametrize("how", ["keep_original", "failed_proof"])
def test_a_duplicate_put_leaves_nothing_of_its_own(tmp_path, monkeypatch, how):
    """The second PUT of the same bytes is answered with the first dataset; what its
    pass wrote (its archive, its own original written as it streamed, or its chunks and
    tail) is gone."""
    data_dir = tmp_path / "data"
    raw = odd_4bit(tmp_path)
    if how == "failed_proof":
        fail_proof_at(monkeypatch, 2)
    with make_client(data_dir, keep_original=how == "keep_original") as c:
        first = c.put("/v1/uploads/d.mrc", content=raw).json()["dataset"]
        before = sorted(files_under(data_dir / "datasets"))
        again = c.put("/v1/uploads/d.mrc", content=raw).json()
        assert again["duplicate"] is True and again["dataset"]["id"] == first["id"]
        assert sorted(files_under(data_dir / "datasets")) == before
        assert c.get(f"/v1/datasets/{first['id']}/download").content == raw
    assert_consistent(data_dir)


def test_a_proven_put_leaves_no_scratch_copy_behind(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    seen = nothing_in_incoming_when_all_bytes_are_in(monkeypatch, data_dir)
    raw = odd_4bit(tmp_path, nz=12)
    with make_client(data_dir, keep_original=True) as c:
        ds = c.put("/v1/uploads/k.mrc", content=raw).json()["dataset"]
        detail = c.get(f"/v1/datasets/{ds['id']}").json()
        assert detail["storage"]["form"] == "archive"
        originals = [p for p in files_under(data_dir / "datasets" / ds["id"])
                     if p.parent.name == "original"]
        assert [p.read_bytes() for p in originals] == [raw]
        assert c.get(f"/v1/datasets/{ds['id']}/download").content == raw
    assert seen == [[]]
    assert_consistent(data_dir)

