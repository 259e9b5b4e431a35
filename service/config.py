"""Service settings, read from the environment (prefix ``MRC_INGEST_``) by pydantic-settings.

Nothing reads the environment at import time: :func:`service.api.create_app` takes a
:class:`Settings` (tests build their own), and ``mrc-ingest serve`` builds one from the
environment. Lists such as ``MRC_INGEST_ALLOWED_ROOTS`` are JSON (``'["/shared"]'``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .auth import TokenSpec
from .mrc import Codec
from .mrc.codec import CODEC_BY_NAME
from .mrc.validate import FrameLimits

GiB = 1 << 30
MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MRC_INGEST_", extra="ignore")

    host: str = Field("127.0.0.1", description="address `mrc-ingest serve` listens on "
                      "(also --host); anything but loopback needs tokens")
    port: int = Field(8000, ge=0, le=65535, description="port of `mrc-ingest serve` "
                      "(also --port)")
    data_dir: Path = Field(Path("mrc-ingest-data"),
                           description="the embedded store (archives, records, conversions) "
                           "and SQLite catalog; with an object store, this replica's "
                           "scratch space (particle files while they arrive)")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the catalog; "
                                     "default sqlite:///<data_dir>/catalog.sqlite3; "
                                     "postgresql+psycopg://user:pw@host/db for replicas")
    storage_url: str | None = Field(None, description="where everything stored lives: unset "
                                    "for the data folder, s3://bucket/prefix for an "
                                    "S3-compatible object store")
    s3_endpoint_url: str | None = Field(None, description="endpoint of an S3-compatible "
                                        "store other than AWS (credentials: the usual AWS "
                                        "environment variables)")
    s3_part_bytes: int = Field(8 << 20, ge=5 << 20, description="S3 multipart part size")
    job_lease_seconds: float = Field(30.0, gt=1, le=3600, description="a job's lease; a "
                                     "worker renews it every third of this, and another "
                                     "replica takes a job over once it lapses")
    migrate_on_start: bool = Field(True, description="upgrade the catalog schema at start "
                                   "(else run `mrc-ingest migrate`)")
    allowed_roots: list[Path] = Field(default_factory=list,
                                      description="folders from which POST /v1/registrations "
                                                  "may register files (symlinks resolved)")
    workers: int = Field(2, ge=0, le=64, description="processing threads; 0: this process "
                         "answers the API only and runs no jobs")
    work_nice: int = Field(10, ge=0, le=19, description="how much nicer than the process "
                           "the threads run that ingest uploads and run jobs (Linux), so "
                           "that requests never wait for a core behind them; 0: the same "
                           "priority")
    max_upload_bytes: int = Field(64 * GiB, gt=1024, description="largest accepted upload; "
                                  "a multipart body counts whole (the movie, its sidecars "
                                  "and every other part)")
    max_multipart_parts: int = Field(16, ge=1, le=10_000, description="parts a multipart "
                                     "body may have (the movie, its sidecars, any field); "
                                     "one more is refused with 413")
    max_json_bytes: int = Field(1 * MiB, ge=1024, description="largest JSON request body "
                                "(registrations, conversion requests); a larger one is "
                                "refused with 413 as soon as it is seen to be larger")
    max_frames: int = Field(100_000, ge=1, description="most frames (NZ) a file may "
                            "declare; a header declaring more is refused with 422 as soon "
                            "as it arrives, before anything is stored")
    min_frame_bytes: int = Field(256, ge=0, description="frames smaller than this (NX x NY "
                                 "in the file's mode) are few or refused: see "
                                 "max_small_frames; 0: no such rule")
    max_small_frames: int = Field(10_000, ge=0, description="most frames a file may declare "
                                  "when they are smaller than min_frame_bytes; a header "
                                  "declaring more such frames is refused with 422 as it "
                                  "arrives (every frame costs fixed work, whatever its size)")
    normalize: bool = Field(True, description="default policy: store 4-bit (mode 101) data "
                                              "normalized to mode 0, losslessly")
    archive_codec: str = Field("zstd", description="MRCZ codec of the archive copy kept for "
                                                   "each dataset, or 'none' for no archive")
    archive_clevel: int = Field(1, ge=0, le=9)
    keep_original: bool = Field(False, description="keep the file as received beside its "
                                "archive; by default the archive plus a small restore "
                                "record is the stored form, proven to give back the exact "
                                "bytes before the received bytes are released")
    conversion_cache_bytes: int = Field(32 * GiB, ge=0, description="converted downloads "
                                        "kept for reuse; least recently used go first")
    preview_cache_items: int = Field(256, ge=0, description="PNG previews kept in memory")
    tokens: list[TokenSpec] = Field(default_factory=list, description="API tokens as JSON: "
                                    '[{"name": "scope1", "role": "write", "sha256": "<hex>"}]'
                                    "; make one with `mrc-ingest token`. None: the API is "
                                    "open and binds to loopback only")
    allow_hard_links: bool = Field(False, description="register files with more than one "
                                   "hard link (one may sit outside the allowed roots)")
    tus_expiry_hours: float = Field(72, gt=0, description="an unfinished tus upload is "
                                    "dropped this long after it was created")
    sum_preview_size: int = Field(1024, ge=64, le=8192, description="longest side of the "
                                  "frame sum computed at ingest")
    session_refresh_seconds: float = Field(1.0, ge=0, le=60, description="a session's "
                                           "figures are recomputed at most this often: "
                                           "the first change after a quiet spell at once, "
                                           "later ones together at its end (0: after every "
                                           "change)")
    recovery_seconds: float = Field(15.0, gt=0, le=60, description="how often each replica "
                                    "with workers runs the commit protocol's recovery "
                                    "steps (ARCHITECTURE.md): a complete upload without its "
                                    "dataset becomes one within this (plus its ingest)")
    cs_mm: float | None = Field(None, ge=0, allow_inf_nan=False, description="the "
                                "microscope's spherical aberration in mm, written to movies "
                                ".star (rlnSphericalAberration) when a request gives no "
                                "?cs_mm= (2.7 for a Krios); unset: the request must")
    amplitude_contrast: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                             description="amplitude contrast (0 to 1) "
                                             "written to movies.star (rlnAmplitudeContrast) "
                                             "when a request gives no ?amplitude_contrast= "
                                             "(RELION's default is 0.1); unset: the request "
                                             "must")

    @field_validator("archive_codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        value = value.lower()
        if value != "none":
            codec = CODEC_BY_NAME.get(value)
            if codec is None or not codec.available:
                usable = [c.cname for c in Codec if c is not Codec.NONE and c.available]
                raise ValueError(f"archive codec {value!r} unknown or unavailable; use one "
                                 f"of {usable} or 'none'")
        return value

    @property
    def frame_limits(self) -> FrameLimits:
        """The header limits, as the format core takes them."""
        return FrameLimits(max_frames=self.max_frames, min_frame_bytes=self.min_frame_bytes,
                           max_small_frames=self.max_small_frames,
                           setting_prefix="MRC_INGEST_")

    @property
    def archive(self) -> Codec:
        return Codec.NONE if self.archive_codec == "none" else CODEC_BY_NAME[self.archive_codec]

    @property
    def catalog_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'catalog.sqlite3'}"

    @property
    def catalog_display(self) -> str:
        """The catalog URL without its password, for logs."""
        from sqlalchemy.engine import make_url

        return make_url(self.catalog_url).render_as_string(hide_password=True)
