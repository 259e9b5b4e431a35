"""The work the thread pool does: ingest a dataset, or convert one for download.

Ingest (DESIGN section 5): open and check the header -> read every frame once (exact
statistics, data checks, the frame sum for previews) -> check the header statistics ->
write the archive copy (normalized, MRCZ by default) -> catalog row ``ready``. A file that
fails any error-level check becomes ``rejected`` with its findings; the file stays for
inspection until deleted.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import mrc
from .catalog import Catalog
from .config import Settings
from .errors import Conflict, NotFound, error_body
from .jobs import JobCancelled, JobContext, JobDeferred
from .mrc.convert import default_mode
from .mrc.extended import ExtendedHeader
from .mrc.findings import Finding, has_errors
from .mrc.modes import mode_spec
from .mrc.preview import BinnedSum
from .mrc.stats import FrameStats, frame_series
from .mrc.validate import check_stats, open_checked, scan
from .mrc.writer import fsync_directory
from .sidecars import acquisition
from .storage import PART_SUFFIX, Storage, sha256_file

log = logging.getLogger("mrc_ingest.pipeline")


def target_to_dict(target: mrc.Target) -> dict[str, Any]:
    return {"mode": target.mode, "codec": target.codec.cname, "clevel": target.clevel,
            "byte_order": target.byte_order}


def target_from_dict(d: dict[str, Any]) -> mrc.Target:
    return mrc.Target(mode=d["mode"], codec=mrc.Codec.from_name(d["codec"]),
                      clevel=d["clevel"], byte_order=d["byte_order"])


def archive_target(src: mrc.MrcFile, codec: mrc.Codec, clevel: int,
                   normalize: bool) -> mrc.Target:
    """The archive copy's form. ``normalize`` picks the natural lossless mode (4-bit ->
    mode 0); without it the source mode stays unless no archive can hold it (4-bit in
    MRCZ, IMOD's unsigned bytes in mode 0)."""
    keeps_mode = src.mode != 101 and src.dtype == mode_spec(src.mode).dtype
    mode = src.mode if keeps_mode and not normalize else default_mode(src)
    return mrc.Target(mode=mode, codec=codec, clevel=clevel)


def source_fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_source_unchanged(dataset: dict[str, Any]) -> Path:
    """The dataset's file, after checking a registered file was not changed since it was
    ingested (it lives on shared storage, outside our control)."""
    path = Path(dataset["path"])
    recorded = dataset["info"].get("source_fingerprint")
    try:
        current = source_fingerprint(path)
    except FileNotFoundError:
        raise Conflict(f"the file {str(path)!r} of dataset {dataset['id']} is gone") from None
    if recorded and current != recorded:
        raise Conflict(f"the registered file {str(path)!r} changed after it was ingested "
                       f"(size/mtime {recorded} -> {current}); register it again")
    return path


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{PART_SUFFIX}")
    with open(temp, "xb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent)


class Pipeline:
    """The job runner given to :class:`service.jobs.JobQueue`."""

    def __init__(self, settings: Settings, catalog: Catalog, storage: Storage):
        self.settings, self.catalog, self.storage = settings, catalog, storage
        #: set by the app once the queue exists: re-submits deferred conversions
        self.submit: Callable[[str], Any] = lambda job_id: None
        self.acquisition_lock = threading.Lock()

    def __call__(self, job: dict[str, Any], ctx: JobContext) -> dict[str, Any] | None:
        if job["kind"] == "ingest":
            return self.ingest(job["dataset_id"], ctx)
        if job["kind"] == "convert":
            return self.convert(job["dataset_id"], target_from_dict(job["target"]), ctx)
        raise ValueError(f"unknown job kind {job['kind']!r}")

    # -- ingest -----------------------------------------------------------------------

    def ingest(self, dataset_id: str, ctx: JobContext) -> dict[str, Any] | None:
        dataset = self.catalog.get_dataset(dataset_id)
        if dataset is None:
            return None
        started = time.perf_counter()
        self.catalog.update_dataset(dataset_id, status="processing")
        info = dict(dataset["info"])
        path = Path(dataset["path"])
        try:
            outcome = self._ingest(dataset, info, path, ctx, started)
        except JobCancelled:
            raise
        except Exception as exc:
            self.catalog.update_dataset(dataset_id, status="failed", progress=None,
                                        info={**info, "error": error_body(exc)})
            self._release_conversions(dataset_id)
            raise
        self._release_conversions(dataset_id)
        return outcome

    def _ingest(self, dataset: dict[str, Any], info: dict[str, Any], path: Path,
                ctx: JobContext, started: float) -> dict[str, Any]:
        dataset_id = dataset["id"]
        fields: dict[str, Any] = {}
        if dataset["source"] == "registration":
            info["source_fingerprint"] = source_fingerprint(path)
            fields["sha256"] = sha256_file(path)
            fields["size_bytes"] = info["source_fingerprint"]["size"]
        src, findings = open_checked(path)
        if src is None:
            return self._reject(dataset_id, info, fields, findings, started)
        with src:
            described = src.describe()
            described.pop("path")
            info["file"] = described
            info["default_mode"] = default_mode(src)
            fields.update(mode=src.mode, nx=src.layout.nx, ny=src.layout.ny,
                          nz=src.layout.nz, dtype=str(src.dtype),
                          pixel_size=float(src.voxel_size[0]))
            target = self._archive_target(src, info)
            passes = 2 if target is not None else 1
            total = src.n_frames * passes

            def report(done: int, total: int) -> None:
                if ctx.progress(done, total):
                    self.catalog.update_dataset(dataset_id, progress={
                        "phase": "processing", "done": done, "total": total,
                        "unit": "frames"})
            sums = BinnedSum(src.layout.ny, src.layout.nx, self.settings.sum_preview_size)
            scan_started = time.perf_counter()
            per_frame: list[FrameStats] = []
            stats, more = scan(src, lambda done, _n: report(done, total), sums.add,
                               per_frame)
            if stats is not None:
                fields["frame_stats"] = frame_series(per_frame)
            info["timings"] = {"scan_s": round(time.perf_counter() - scan_started, 3)}
            findings += more
            if stats is not None:
                info["stats"] = stats.to_dict()
                findings += check_stats(src.header, stats)
            if has_errors(findings):
                return self._reject(dataset_id, info, fields, findings, started,
                                    src.extended)
            self.storage.dataset_dir(dataset_id).mkdir(parents=True, exist_ok=True)
            save_npy_atomically(self.storage.sum_path(dataset_id), sums.total)
            info["sum"] = {"frames": sums.frames, "bin": [sums.fy, sums.fx]}
            if target is not None:
                archive_started = time.perf_counter()
                nz = src.n_frames
                report = mrc.convert(src, self.storage.archive_path(dataset_id, target.is_mrcz),
                                     target, known_stats=stats,
                                     progress=lambda done, _n: report(nz + done, total))
                info["timings"]["archive_s"] = round(time.perf_counter() - archive_started, 3)
                archive_bytes = report.file_bytes_out
                info["archive"] = {"mode": report.target_mode, "codec": report.codec,
                                   "clevel": report.clevel, "bytes": archive_bytes,
                                   "ratio_to_original": round(dataset_size(fields, dataset)
                                                              / archive_bytes, 4),
                                   "notes": report.notes}
                fields["stored_bytes"] = archive_bytes
        info["findings"] = [f.to_dict() for f in findings]
        info["timings"]["total_s"] = round(time.perf_counter() - started, 3)
        self._finish(dataset_id, "ready", info, fields, src.extended)
        return {"status": "ready", "findings": len(findings),
                "bytes_written": fields.get("stored_bytes") or 0}

    def _archive_target(self, src: mrc.MrcFile, info: dict[str, Any]) -> mrc.Target | None:
        """The archive copy to write, or None when the file as received already is it
        (or the settings keep no archive and nothing needs normalizing)."""
        normalize = info.get("normalize", self.settings.normalize)
        target = archive_target(src, self.settings.archive, self.settings.archive_clevel,
                                normalize)
        if target.codec is src.layout.codec and target.mode == src.mode:
            info["archive_note"] = "the file as received is already in archive form"
            return None
        return target

    def _reject(self, dataset_id: str, info: dict[str, Any], fields: dict[str, Any],
                findings: list[Finding], started: float,
                extended: ExtendedHeader | None = None) -> dict[str, Any]:
        info["findings"] = [f.to_dict() for f in findings]
        info.setdefault("timings", {})["total_s"] = round(time.perf_counter() - started, 3)
        self._finish(dataset_id, "rejected", info, fields, extended)
        return {"status": "rejected", "findings": len(findings)}

    def _finish(self, dataset_id: str, status: str, info: dict[str, Any],
                fields: dict[str, Any], extended: ExtendedHeader | None) -> None:
        """The final write of an ingest, with the acquisition summary computed under the
        same lock a sidecar arriving meanwhile takes, so neither overwrites the other."""
        with self.acquisition_lock:
            self._apply_acquisition(dataset_id, info, fields, extended)
            self.catalog.update_dataset(dataset_id, status=status, info=info, progress=None,
                                        **fields)

    def _apply_acquisition(self, dataset_id: str, info: dict[str, Any],
                           fields: dict[str, Any], extended: ExtendedHeader | None) -> None:
        summary, findings, parsed = acquisition(self.catalog.sidecars_of(dataset_id), extended)
        info["acquisition"] = summary
        info["sidecars"] = parsed
        info["sidecar_findings"] = [f.to_dict() for f in findings]
        fields["voltage_kv"] = summary.get("voltage_kv")
        fields["total_dose"] = summary.get("total_dose")

    def refresh_acquisition(self, dataset_id: str) -> dict[str, Any] | None:
        """Recompute a dataset's acquisition summary after a sidecar arrived."""
        with self.acquisition_lock:
            dataset = self.catalog.get_dataset(dataset_id)
            if dataset is None:
                return None
            extended = None
            try:
                with mrc.MrcFile(dataset["path"]) as src:
                    extended = src.extended
            except (mrc.MrcError, OSError):
                pass  # not readable (yet): the sidecars alone
            info, fields = dict(dataset["info"]), {}
            self._apply_acquisition(dataset_id, info, fields, extended)
            self.catalog.update_dataset(dataset_id, info=info, **fields)
            return self.catalog.get_dataset(dataset_id)

    def _release_conversions(self, dataset_id: str) -> None:
        """Conversions requested while the dataset was ingesting can run now (or fail
        with the reason, if the dataset was rejected)."""
        for job in self.catalog.jobs_in_states(("queued",), dataset_id=dataset_id):
            if job["kind"] == "convert":
                self.submit(job["id"])

    # -- conversions ------------------------------------------------------------------

    def convert(self, dataset_id: str, target: mrc.Target,
                ctx: JobContext) -> dict[str, Any]:
        dataset = self.catalog.get_dataset(dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} was deleted")
        if dataset["status"] in ("queued", "processing"):
            raise JobDeferred(dataset_id)  # the ingest job re-submits it
        if dataset["status"] != "ready":
            raise Conflict(f"dataset {dataset_id} is {dataset['status']}, not ready; its "
                           "findings say why")
        output = self.storage.conversion_path(dataset_id, target)
        written = 0
        if not output.exists():
            source = check_source_unchanged(dataset)
            output.parent.mkdir(parents=True, exist_ok=True)
            written = mrc.convert(source, output, target, progress=ctx.progress).file_bytes_out
            self.storage.evict_conversions(self.settings.conversion_cache_bytes, keep=output)
        return {"bytes": output.stat().st_size, "file": output.name, "bytes_written": written}


def dataset_size(fields: dict[str, Any], dataset: dict[str, Any]) -> int:
    return int(fields.get("size_bytes", dataset["size_bytes"]))
