"""Schema migrations: a catalog made by the last release before migrations (a SQLite
file it wrote, checked in as ``tests/golden/catalog-2026-11-24.sqlite3``: the release's own
``Catalog`` created it, with uploads, a registration, sidecars, a particle set, tus
uploads and jobs) is upgraded without losing a row; fresh catalogs on SQLite and on a
real PostgreSQL migrate to the same head, down to the baseline and up again, and two
replicas migrating at once do it once."""

from __future__ import annotations

import json

import shutil
import sqlite3
import threading

import pytest
import sqlalchemy as sa

from service.catalog import Catalog
from service.catalog.migrate import current_revision, head_revision, upgrade

GOLDEN = "tests/golden/catalog-2026-11-24.sqlite3"


def table_rows(path) -> dict[str, int]:
    with sqlite3.connect(path) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("datasets", "sidecars", "particle_sets", "tus_uploads", "jobs")}


def test_a_catalog_from_before_migrations_keeps_every_row(tmp_path):
    path = tmp_path / "catalog.sqlite3"
    shutil.copy(GOLDEN, path)
    before = table_rows(path)
    catalog = Catalog(f"sqlite:///{path}")
    try:
        with catalog.engine.connect() as conn:
            assert current_revision(conn) == head_revision()
        assert table_rows(path) == before
        upload = catalog.get_dataset("up0000000000000000a1")
        assert (upload["name"], upload["status"], upload["voltage_kv"]) == \
            ("grid1_movie.mrc", "ready", 300.0)
        assert upload["path"] == ""  # the catalog names keys now, not paths
        assert upload["info"]["storage"] == {
            "form": "legacy", "bytes": {},
            "keys": {"original": "datasets/up0000000000000000a1/grid1_movie.mrc",
                     "archive": "datasets/up0000000000000000a1/archive.mrcz",
                     "sum": "datasets/up0000000000000000a1/sum.npy"}}
        assert upload["info"]["stats"]["dmax"] == 15.0  # the rest of info is kept
        assert upload["camera"] is None and upload["progress"] is None  # new columns
        registration = catalog.get_dataset("reg000000000000000b1")
        assert registration["path"] == "/shared/scope1/scope.mrc"  # the user's file stays
        # Two live uploads of the same bytes (possible before the unique index): the
        # older stays, the other is marked with the reason, nothing is deleted.
        twin = catalog.get_dataset("up0000000000000000a2")
        assert twin["status"] == "failed" and twin["info"]["error"]["error"] == "duplicate"
        assert "up0000000000000000a1" in twin["info"]["error"]["detail"]
        assert [s["id"] for s in catalog.sidecars_of("up0000000000000000a1")] == ["sc1"]
        assert [s["id"] for s in catalog.pending_sidecars()] == ["sc2"]
        assert catalog.get_particle_set("ps1")["rows"] == 10
        finished, open_upload = catalog.get_tus_upload("tus1"), catalog.get_tus_upload("tus2")
        assert finished["completed_at"] == finished["created_at"]
        assert open_upload["completed_at"] is None and open_upload["offset"] == 5
        assert catalog.get_job("job1")["state"] == "done"
        interrupted = catalog.get_job("job2")  # it was running: it runs again
        assert interrupted["state"] == "queued" and interrupted["run_after"]
        assert catalog.claim_job("replica-a", 30)["id"] == "job2"
        assert catalog.name_index  # the SQLite trigram index of names came along
    finally:
        catalog.close()


def test_new_catalogs_reach_the_same_head_on_sqlite_and_postgres(tmp_path, pg_url):
    sqlite = Catalog(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    pg = Catalog(pg_url)
    try:
        for catalog in (sqlite, pg):
            inspector = sa.inspect(catalog.engine)
            tables = set(inspector.get_table_names()) - {"alembic_version", "datasets_name",
                                                         "datasets_name_config",
                                                         "datasets_name_data",
                                                         "datasets_name_docsize",
                                                         "datasets_name_idx"}
            assert tables == {"datasets", "sidecars", "particle_sets", "tus_uploads",
                              "conversions", "jobs", "sessions"}
            columns = {c["name"] for c in inspector.get_columns("jobs")}
            assert {"lease_owner", "lease_expires_at", "attempts", "max_attempts",
                    "run_after", "cancel_requested", "dedup_key"} <= columns
            indexes = {i["name"] for i in inspector.get_indexes("datasets")}
            assert "uq_datasets_live_upload_project_sha256" in indexes
        pg_indexes = {i["name"] for i in sa.inspect(pg.engine).get_indexes("datasets")}
        assert "ix_datasets_name_trgm" in pg_indexes  # pg_trgm serves ILIKE '%x%'
    finally:
        sqlite.close()
        pg.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_down_to_the_baseline_and_up_again(tmp_path, pg_url, backend):
    from alembic import command

    from service.catalog.migrate import alembic_config

    url = pg_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'c.sqlite3'}"
    catalog = Catalog(url)
    try:
        catalog.add_dataset(id="d1", name="m.mrc", source="upload", status="ready",
                            size_bytes=1, path="", sha256="f" * 64)
        with catalog.engine.connect() as conn:
            command.downgrade(alembic_config(conn), "0001")
            conn.commit()
            assert current_revision(conn) == "0001"
            assert "conversions" not in sa.inspect(conn).get_table_names()
        assert upgrade(catalog.engine) == ("0001", head_revision())
        assert catalog.get_dataset("d1")["sha256"] == "f" * 64
    finally:
        catalog.close()


def test_replicas_starting_together_migrate_once(pg_url):
    """Four processes' worth of catalogs opening one new PostgreSQL database at the same
    instant: the advisory lock lets one migrate; the others find it done."""
    results, errors = [], []

    def start():
        try:
            catalog = Catalog(pg_url)
            with catalog.engine.connect() as conn:
                results.append(current_revision(conn))
            catalog.close()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [head_revision()] * 4


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sessions_revision_derives_what_older_rows_lack(tmp_path, pg_url, backend):
    """Revision 0004 on rows stored before it: each goes to session `<source>-<day>` in
    project default with its figures; a blanked frame in its stored means counts as
    standing out; a pixel size that was only a placeholder becomes unknown."""
    from alembic import command

    from service.catalog.migrate import alembic_config

    url = pg_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'c.sqlite3'}"
    catalog = Catalog(url)
    try:
        with catalog.engine.connect() as conn:
            command.downgrade(alembic_config(conn), "0003")
            conn.commit()
            placeholder = {"acquisition": {"pixel_size_angstrom": 10.0, "pixel_size_sources": [
                {"source": "mrc_header", "key": "CELLA/MX", "value": 10.0,
                 "placeholder": True}]}}
            real = {"acquisition": {"pixel_size_angstrom": 0.83, "pixel_size_sources": [
                {"source": "mdoc", "key": "PixelSpacing", "value": 0.83}]}}
            for row in (("a", "2026-12-01T10:00:00.000000+00:00", placeholder,
                         {"mean": [5.0, 5.1, 0.0, 4.9, 5.0]}),
                        ("b", "2026-12-01T11:00:00.000000+00:00", real,
                         {"mean": [5.0, 4.95, 4.9, 4.85]})):
                conn.execute(sa.text(
                    "INSERT INTO datasets (id, name, source, status, created_at, "
                    "updated_at, size_bytes, path, info, pixel_size, frame_stats) VALUES "
                    "(:id, :id, 'upload', 'ready', :t, :t, 100, '', :info, :px, :fs)"),
                    {"id": row[0], "t": row[1], "info": json.dumps(row[2]),
                     "px": row[2]["acquisition"]["pixel_size_angstrom"],
                     "fs": json.dumps(row[3])})
            conn.commit()
        upgrade(catalog.engine)
        a, b = catalog.get_dataset("a"), catalog.get_dataset("b")
        assert (a["pixel_size"], a["standout_frames"]) == (None, 1)
        assert "pixel_size_angstrom" not in a["info"]["acquisition"]
        assert (b["pixel_size"], b["standout_frames"]) == (0.83, 0)
        assert a["session_id"] == b["session_id"] and a["project"] == "default"
        session = catalog.get_session(a["session_id"])
        assert (session["name"], session["movies"], session["ready"]) == (
            "upload-2026-12-01", 2, 2)
        assert session["summary"]["acquisition"]["pixel_size_angstrom"] == {
            "min": 0.83, "max": 0.83}
        assert session["summary"]["problems"]["standing_out_count"] == 1
    finally:
        catalog.close()
