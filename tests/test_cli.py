"""The mrc-ingest command line: JSON out, one-line errors, exit codes."""

import json
import subprocess
import sys

import mrcfile
import mrcz
import numpy as np
import pytest

from service.cli import main
from tests.reference import counting_movie, write_raw_mrc


def test_inspect_prints_facts_and_findings(tmp_path, capsys):
    data = counting_movie((3, 4, 5))
    path = write_raw_mrc(tmp_path / "m.mrc", data, 101, cella=(5.0, 4.0, 3.0),
                         stats=(0.0, float(data.max()), float(data.mean()), float(data.std())))
    assert main(["inspect", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == 101 and report["dtype"] == "uint8"
    assert (report["nx"], report["ny"], report["frames"]) == (5, 4, 3)
    assert report["pixel_size_angstrom"] == [1.0, 1.0, 3.0]
    assert report["byte_order"] == "little" and report["compression"] is None
    assert report["data_offset"] == 1024
    assert report["valid"] is True
    assert report["stats"]["dmax"] == data.max()
    assert {"severity", "field", "message"} <= set(report["findings"][0])  # odd-NX info


def test_inspect_bad_file_exits_nonzero_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an mrc file" * 100)
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an MRC header" in err
    assert main(["inspect", str(tmp_path / "missing.mrc")]) == 1


def test_convert_to_mrcz_defaults_to_zstd_1(tmp_path, capsys):
    data = counting_movie((4, 8, 8))
    src = write_raw_mrc(tmp_path / "m.mrc", data, 101)
    assert main(["convert", str(src), str(tmp_path / "o.mrcz")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["codec"], report["clevel"], report["target_mode"]) == ("zstd", 1, 0)
    image, _ = mrcz.readMRC(str(tmp_path / "o.mrcz"))
    np.testing.assert_array_equal(image, data)


def test_convert_mode_and_refusal(tmp_path, capsys):
    data = np.linspace(-1, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    src = write_raw_mrc(tmp_path / "f.mrc", data, 2)
    assert main(["convert", str(src), str(tmp_path / "o.mrc"), "--mode", "0"]) == 1
    err = capsys.readouterr().err
    assert "lossless target modes for this file: [2, 4]" in err and err.count("\n") == 1
    assert not (tmp_path / "o.mrc").exists()
    assert main(["convert", str(src), str(tmp_path / "o.mrc"), "--big-endian"]) == 0
    with mrcfile.open(tmp_path / "o.mrc") as m:
        assert m.header.mode.dtype.byteorder == ">"
        np.testing.assert_array_equal(m.data, data)


def test_usage_errors_exit_2(tmp_path, capsys):
    src = write_raw_mrc(tmp_path / "m.mrc", counting_movie((1, 2, 2)), 101)
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), str(tmp_path / "o.mrc"), "--codec", "zstd"])
    assert exc.value.code == 2
    assert "--codec needs an output file ending .mrcz" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    src = write_raw_mrc(tmp_path / "m.mrc", counting_movie((1, 2, 2)), 101)
    out = subprocess.run([sys.executable, "-m", "service.cli", "inspect", "--quick", str(src)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["mode"] == 101
