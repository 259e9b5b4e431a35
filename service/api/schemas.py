"""Response and request shapes (for validation and /docs), and the functions that turn
catalog rows into them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="stable error code, e.g. not_mrc, invalid_mrc, too_large")
    detail: Any = Field(description="what was wrong and where")


class JobProgress(BaseModel):
    done: int
    total: int
    fraction: float | None


class Job(BaseModel):
    id: str
    kind: Literal["upload", "ingest", "convert", "verify"] = Field(
        description="upload: a movie ingested while it streamed; ingest: a registered file "
                    "(or a resumable upload) read once; convert; verify: the stored form "
                    "rebuilt and checked against the SHA-256 taken on receipt")
    dataset_id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: JobProgress
    target: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = Field(0, description="runs so far (a worker that died counts)")
    worker: str | None = Field(None, description="the replica running it (its lease owner)")
    links: dict[str, str]


class JobPage(BaseModel):
    items: list[Job]


class DatasetProgress(BaseModel):
    phase: Literal["receiving", "processing"]
    done: int
    total: int | None = Field(description="null while the size is not known")
    unit: Literal["bytes", "frames"]


class DatasetSummary(BaseModel):
    id: str
    name: str
    source: Literal["upload", "registration"]
    status: Literal["receiving", "queued", "processing", "ready", "rejected", "failed"]
    created_at: str
    updated_at: str
    size_bytes: int = Field(description="the file as received")
    stored_bytes: int | None = Field(None, description="everything kept for the dataset: "
                                     "archive, restore record, frame sum, the file as "
                                     "received where it is kept, cached conversions")
    compression_ratio: float | None = Field(None, description="size_bytes / stored_bytes")
    storage_ratio: float | None = Field(None, description="stored_bytes / size_bytes: what "
                                        "the dataset costs per byte received")
    sha256: str | None = None
    mode: int | None = None
    dtype: str | None = None
    nx: int | None = None
    ny: int | None = None
    frames: int | None = None
    pixel_size_angstrom: float | None = None
    voltage_kv: float | None = Field(None, description="from a sidecar or extended header")
    total_dose: float | None = Field(None, description="e-/Å², all images together")
    exposure_s: float | None = Field(None, description="exposure of the whole movie, s")
    magnification: float | None = None
    camera: str | None = Field(None, description="camera model, from a sidecar or "
                                                 "extended header")
    progress: DatasetProgress | None = Field(None, description="while the dataset is being "
                                      "received or processed; null once it is done")
    session_id: str | None = Field(None, description="its session (GET /v1/sessions/{id})")
    project: str | None = Field(None, description="its session's project")
    standout_frames: int | None = Field(None, description="frames whose mean stands far "
                                        "from the others' (a blanked or dropped frame)")
    links: dict[str, str]


class DatasetDetail(DatasetSummary):
    byte_order: str | None = None
    file: dict[str, Any] | None = Field(None, description="header and derived facts")
    stats: dict[str, float | None] | None = Field(None, description="exact, over every "
                                                "frame; null where not finite (NaN data)")
    findings: list[dict[str, str]] = Field(default_factory=list)
    archive: dict[str, Any] | None = Field(None, description="the MRCZ archive: mode, codec, "
                                           "bytes; restorable (whether archive + restore "
                                           "record were proven to give back the bytes as "
                                           "received) and, if not, the reason")
    storage: dict[str, Any] | None = Field(None, description="the stored form (archive, "
                                           "original, registered) and the bytes of each "
                                           "part kept, conversions included")
    timings: dict[str, float] | None = None
    normalize: bool | None = None
    acquisition: dict[str, Any] | None = Field(None, description="voltage, pixel size, dose, "
                                               "exposure, tilt, magnification, times, from "
                                               ".mdoc / info.txt sidecars and FEI/SERI "
                                               "extended headers (units kV, Å, e-/Å², s, °). "
                                               "pixel_size_angstrom is x (the catalog's "
                                               "pixel size), pixel_size_y_angstrom y; "
                                               "pixel_size_sources lists every source's, "
                                               "placeholders (a 1 Å or negative cell) "
                                               "marked and ranked last. Unknown facts are "
                                               "left out")
    sidecars: dict[str, Any] | None = Field(None, description="the parsed sidecar files")
    sidecar_findings: list[dict[str, str]] = Field(default_factory=list)
    error: dict[str, Any] | None = Field(None, description="why processing failed "
                                         "(status failed)")
    jobs: list[Job] = Field(default_factory=list)


class FrameStatsSeries(BaseModel):
    dataset_id: str
    frames: int = Field(description="number of frames; each list has one value per frame")
    mean: list[float | None] = Field(description="mean of each frame (null: undefined, as "
                                                 "for complex data, or not finite)")
    std: list[float | None] = Field(description="population standard deviation of each "
                                                "frame")
    min: list[float | None]
    max: list[float | None]


class DatasetPage(BaseModel):
    items: list[DatasetSummary]
    next_cursor: str | None
    links: dict[str, str]


class SidecarInfo(BaseModel):
    name: str
    kind: Literal["mdoc", "de_info"]
    dataset_id: str | None = Field(description="the movie's dataset; null until it arrives")


class Accepted(BaseModel):
    dataset: DatasetSummary
    job: Job | None
    duplicate: bool = Field(description="the same bytes were uploaded before; this is "
                                        "that dataset")
    sidecars: list[SidecarInfo] = Field(default_factory=list,
                                        description="sidecar parts sent with the movie")


class SidecarAccepted(BaseModel):
    sidecar: SidecarInfo
    dataset: DatasetSummary | None


class ConversionAccepted(BaseModel):
    dataset: DatasetSummary
    job: Job
    duplicate: bool


class RegistrationIn(BaseModel):
    path: str = Field(description="absolute path inside one of the allowed roots")
    normalize: bool | None = Field(None, description="override the default normalization "
                                                      "policy for this dataset")
    session: str | None = Field(None, max_length=200, description="the session it belongs "
                                "to (default: the folder under its allowed root)")
    project: str | None = Field(None, max_length=100, description="the session's project "
                                "(default: 'default', or the token's only project)")


class ConversionIn(BaseModel):
    dataset_id: str
    format: Literal["mrc", "mrcz"] = "mrc"
    mode: int | None = None
    codec: str | None = None
    clevel: int = Field(1, ge=0, le=9)
    endian: Literal["little", "big"] = "little"


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str
    replica: str = Field(description="this process, as it appears as a job lease owner")
    catalog: str = Field(description="ok, or why the catalog cannot be used")
    storage: str = Field(description="ok, or why the datastore cannot be used")
    workers: int
    queue_depth: int | None = Field(description="jobs queued or running (all replicas)")
    data_free_bytes: int = Field(description="free space of this replica's data folder")


#: dataset statuses that may carry progress
IN_FLIGHT = ("receiving", "queued", "processing")


def dataset_links(dataset_id: str) -> dict[str, str]:
    base = f"/v1/datasets/{dataset_id}"
    return {"self": base, "download": f"{base}/download", "frame0": f"{base}/frames/0.png",
            "sum": f"{base}/sum.png"}


def dataset_summary(row: dict[str, Any]) -> dict[str, Any]:
    stored = row.get("stored_bytes")
    return {
        "id": row["id"], "name": row["name"], "source": row["source"],
        "status": row["status"], "created_at": row["created_at"],
        "updated_at": row["updated_at"], "size_bytes": row["size_bytes"],
        "stored_bytes": stored,
        "compression_ratio": round(row["size_bytes"] / stored, 4) if stored else None,
        "storage_ratio": round(stored / row["size_bytes"], 4)
        if stored and row["size_bytes"] else None,
        "sha256": row["sha256"], "mode": row["mode"], "dtype": row["dtype"],
        "nx": row["nx"], "ny": row["ny"], "frames": row["nz"],
        "pixel_size_angstrom": row["pixel_size"], "voltage_kv": row["voltage_kv"],
        "total_dose": row["total_dose"], "exposure_s": row["exposure_s"],
        "magnification": row["magnification"], "camera": row["camera"],
        "progress": row["progress"] if row["status"] in IN_FLIGHT else None,
        "session_id": row.get("session_id"), "project": row.get("project"),
        "standout_frames": row.get("standout_frames"),
        "links": dataset_links(row["id"]),
    }


def dataset_detail(row: dict[str, Any], jobs: list[dict[str, Any]]) -> dict[str, Any]:
    info = row["info"]
    described = info.get("file")
    findings = info.get("findings", info.get("header_findings", []))
    return {
        **dataset_summary(row),
        "byte_order": described["byte_order"] if described else None,
        "file": described, "stats": info.get("stats"), "findings": findings,
        "archive": info.get("archive"), "timings": info.get("timings"),
        "storage": storage_view(row),
        "normalize": info.get("normalize"), "error": info.get("error"),
        "acquisition": info.get("acquisition"), "sidecars": info.get("sidecars"),
        "sidecar_findings": info.get("sidecar_findings", []),
        "jobs": [job_view(j) for j in jobs],
    }


def storage_view(row: dict[str, Any]) -> dict[str, Any] | None:
    storage = row["info"].get("storage")
    if storage is None:
        return None
    kept = sum(storage.get("bytes", {}).values())
    return {"form": storage["form"], "bytes": storage.get("bytes", {}),
            "received_bytes": row["size_bytes"],
            "conversions_bytes": max(0, (row["stored_bytes"] or 0) - kept)}


def job_view(row: dict[str, Any]) -> dict[str, Any]:
    done, total = row["done"], row["total"]
    links = {"self": f"/v1/jobs/{row['id']}", "dataset": f"/v1/datasets/{row['dataset_id']}"}
    if row["kind"] == "convert":
        links["result"] = f"/v1/jobs/{row['id']}/result"
    return {
        "id": row["id"], "kind": row["kind"], "dataset_id": row["dataset_id"],
        "state": row["state"],
        "progress": {"done": done, "total": total,
                     "fraction": round(done / total, 4) if total else None},
        "target": row["target"], "error": row["error"], "result": row["result"],
        "created_at": row["created_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "attempts": row.get("attempts", 0),
        "worker": row.get("lease_owner") if row["state"] == "running" else None,
        "links": links,
    }


class Range(BaseModel):
    min: float
    max: float


class SessionFigures(BaseModel):
    """Counts and bytes of a session's movies (tombstones not counted)."""

    movies: int
    ready: int
    rejected: int
    failed: int
    in_flight: int = Field(description="receiving, queued or processing")
    bytes_received: int
    bytes_stored: int


class SessionSummary(BaseModel):
    id: str
    name: str
    project: str
    source: str = Field(description="how its first movie came: upload or registration")
    microscope: str | None = Field(None, description="camera model of most of its movies")
    created_at: str
    first_movie_at: str | None
    last_movie_at: str | None
    counts: SessionFigures
    acquisition: dict[str, Range | None] = Field(description="each figure's range over the "
                                                 "session's movies (min = max when they "
                                                 "agree; null: unknown for all)")
    rate_per_10_minutes: float | None = Field(None, description="movies per 10 minutes, "
                                              "first to last movie")
    problems: dict[str, int] = Field(description="rejected, failed, standing_out: how many")
    links: dict[str, str]


class SessionDetail(SessionSummary):
    cameras: list[dict[str, Any]]
    rate: dict[str, Any] = Field(description="movies per 10-minute bucket (UTC; empty "
                                 "buckets left out)")
    problem_movies: dict[str, Any] = Field(description="the first rejected movies with their "
                                           "first finding, the movies with frames that "
                                           "stand out, the failed ones")


class SessionPage(BaseModel):
    items: list[SessionSummary]
    next_cursor: str | None = None
    links: dict[str, str] = Field(default_factory=dict)


class SessionChange(BaseModel):
    """Admin: rename a session and/or move it (with its datasets) to another project."""

    name: str | None = Field(None, max_length=200)
    project: str | None = Field(None, max_length=100)


def session_links(session_id: str) -> dict[str, str]:
    base = f"/v1/sessions/{session_id}"
    return {"self": base, "datasets": f"/v1/datasets?session={session_id}",
            "movies.star": f"{base}/movies.star", "movies.csv": f"{base}/movies.csv",
            "dashboard": f"/?session={session_id}"}


def session_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A session as lists show it: from its list columns (never its ``summary``)."""
    return {
        "id": row["id"], "name": row["name"], "project": row["project"],
        "source": row["source"], "microscope": row["microscope"],
        "created_at": row["created_at"], "first_movie_at": row["first_movie_at"],
        "last_movie_at": row["last_movie_at"],
        "counts": {k: row[k] for k in ("movies", "ready", "rejected", "failed", "in_flight",
                                       "bytes_received", "bytes_stored")},
        "acquisition": row["acquisition"] or {},
        "rate_per_10_minutes": row["rate_per_10_minutes"],
        "problems": {"rejected": row["rejected"], "failed": row["failed"],
                     "standing_out": row["standing_out"] or 0},
        "links": session_links(row["id"]),
    }


def session_detail(row: dict[str, Any]) -> dict[str, Any]:
    summary = row["summary"] or {}
    problems = summary.get("problems") or {}
    return {**session_summary(row), "cameras": summary.get("cameras", []),
            "rate": summary.get("rate") or {"bucket_minutes": 10, "per_bucket": None,
                                             "timeline": []},
            "problem_movies": {k: problems.get(k, []) for k in ("rejected", "standing_out",
                                                                 "failed")}}
