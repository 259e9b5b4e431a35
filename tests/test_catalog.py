"""Catalog: name search (trigram index + exact LIKE) against a plain Python filter,
keyset pagination under combined filters, an index added to an older catalog."""

import sqlalchemy as sa

from service.catalog import RARE_NAME_ROWS, Catalog, DatasetQuery, datasets, now

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
