"""Catalog: name search (trigram index + exact LIKE) against a plain Python filter,
keyset pagination under combined filters, an index added to an older catalog."""

import json

import mrcfile
import numpy as np
import pytest
import sqlalchemy as sa

from service.catalog import RARE_NAME_ROWS, Catalog, DatasetQuery, datasets, now
from tests.api_helpers import make_client
from tests.reference import write_raw_mrc

NAMES = ["grid1_sq2_mov3.mrc", "Grid10_SQ2_mov30.mrc", "a%b_c.mrc", "a_b.mrc", "axb.mrc",
         "50%_done.mrc", "ab.mrc", "x\\y.mrc"]


def fill(catalog, names, **extra):
    with catalog.engine.begin() as conn:
        conn.execute(datasets.insert(), [
            {"id": f"{i:06d}", "name": name, "source": "upload" if i % 2 else "registration",
             "status": "ready" if i % 3 else "rejected", "created_at": now(),
             "updated_at": now(), "size_bytes": i, "path": "/x", "mode": i % 4, "info": {},
             **extra} for i, name in enumerate(names)])


def all_pages(catalog, limit=3, **query):
    ids, cursor = [], None
    while True:
        rows, cursor = catalog.list_datasets(DatasetQuery(limit=limit, cursor=cursor, **query))
        ids += [r["id"] for r in rows]
        if cursor is None:
            return ids


def test_name_substring_is_exact_and_case_insensitive(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    assert catalog.name_index
    names = NAMES + [f"bulk_{i}_sq{i % 7}.mrc" for i in range(RARE_NAME_ROWS + 50)]
    fill(catalog, names)
    for text in ["sq2", "GRID1", "a%b", "a_b", "%", "_", "50%_", "x\\y", "ab", "nothing",
                 "bulk_", "_sq3", "k_1"]:
        got = all_pages(catalog, limit=400, name=text, descending=False)
        expected = [f"{i:06d}" for i, n in enumerate(names) if text.lower() in n.lower()]
        assert got == expected, text


def test_combined_filters_paginate_completely(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    fill(catalog, [f"m{i}.mrc" for i in range(40)])
    ids = all_pages(catalog, status="ready", mode=1, source="upload")
    expected = [f"{i:06d}" for i in reversed(range(40)) if i % 3 and i % 4 == 1 and i % 2]
    assert ids == expected


def test_name_index_is_built_for_an_older_catalog(tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    catalog = Catalog(url)
    fill(catalog, NAMES)
    with catalog.engine.begin() as conn:  # as if written before the index existed
        for name in ("datasets_name_ai", "datasets_name_ad", "datasets_name_au"):
            conn.execute(sa.text(f"DROP TRIGGER {name}"))
        conn.execute(sa.text("DROP TABLE datasets_name"))
    catalog.close()
    reopened = Catalog(url)
    rows, _ = reopened.list_datasets(DatasetQuery(name="grid1_sq"))
    assert [r["name"] for r in rows] == ["grid1_sq2_mov3.mrc"]
    reopened.delete_dataset(rows[0]["id"])
    assert reopened.list_datasets(DatasetQuery(name="grid1_sq"))[0] == []


# -- what a catalog row holds of odd values ---------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_movie_of_nan_with_a_nan_cell_is_committed_on_both_catalogs(tmp_path, request,
                                                                     backend):
    """JSON has no NaN: PostgreSQL refused the commit of such a movie's statistics and
    header (a 500, found by a bucket test of test_replicas.py), and SQLite stored text no strict
    JSON reader takes. Both catalogs now hold null where a value is not finite."""
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else \
        f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite3'}"
    data = np.ones((3, 32, 32), np.float32)
    data[1, 4, 4] = np.nan
    data[2, 0, 0] = np.inf
    raw = write_raw_mrc(tmp_path / "nan.mrc", data, 2, cella=(float("nan"), 32.0, 3.0),
                        origin=(float("inf"), 0.0, 0.0)).read_bytes()
    with make_client(tmp_path / "data", database_url=url) as c:
        response = c.put("/v1/uploads/nan.mrc", content=raw)
        assert response.status_code == 201, response.text
        detail = c.get(f"/v1/datasets/{response.json()['dataset']['id']}").json()
        assert detail["status"] == "ready"
        # NaN in any frame makes the movie's extremes NaN, whichever frame it is in
        assert detail["stats"] == {"dmin": None, "dmax": None, "dmean": None, "rms": None}
        assert detail["file"]["header"]["cella"]["x"] is None
        assert c.get(f"/v1/datasets/{detail['id']}/download").content == raw
        # a conversion of it takes its own statistics (the catalog's are null)
        converted = c.get(f"/v1/datasets/{detail['id']}/download", params={"endian": "big"})
        assert converted.status_code == 200, converted.text
        (tmp_path / "big.mrc").write_bytes(converted.content)
        with mrcfile.open(tmp_path / "big.mrc", permissive=True) as m:
            assert np.array_equal(m.data, data, equal_nan=True)
            assert np.isnan(m.header.dmin) and np.isnan(m.header.dmax)
    with sa.create_engine(url).connect() as conn:  # the stored text, read by plain SQL
        for (info,) in conn.execute(sa.text("SELECT CAST(info AS TEXT) FROM datasets")):
            parsed = json.loads(info, parse_constant=lambda name: pytest.fail(name))
            assert parsed["stats"]["dmin"] is None
