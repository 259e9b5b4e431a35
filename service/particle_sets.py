"""cryoSPARC particle sets in the service: store the .cs (received through the same
writer as every upload, then kept in the datastore), check every stack and index it
names (inside an allowed root), list particles, preview one, export rows as one MRC
stack (made once on a worker thread into the datastore, then served like any converted
download)."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import numpy as np

from .auth import DEFAULT_PROJECT, Scope
from .catalog import Catalog
from .config import Settings
from .datastore import ObjectMissing
from .errors import BadRequest, NotFound, PathNotAllowed, from_core
from .mrc import MrcError
from .mrc.header import HEADER_SIZE
from .mrc.particles import (ParticleSet, export_stack, jsonable, load_cs, open_particle_set,
                            row_dict)
from .mrc.preview import binned, contrast_u8
from .mrc.source import FileSource
from .receiver import ScratchCopy, pump
from .errors import RefusedFile
from .roots import Roots
from .storage import Storage, particle_set_prefix
from .uploads import check_filename

LOADED_SETS = 8  # parsed and validated sets kept in memory


def cs_key(set_id: str, name: str) -> str:
    return f"{particle_set_prefix(set_id)}{name}"


class ParticleSets:
    def __init__(self, settings: Settings, catalog: Catalog, storage: Storage, roots: Roots):
        self.settings, self.catalog, self.storage, self.roots = settings, catalog, storage, roots
        self._loaded: OrderedDict[str, ParticleSet] = OrderedDict()
        self._lock = threading.Lock()

    async def create(self, name: str, chunks: AsyncIterator[bytes], folder: str,
                     project: str = DEFAULT_PROJECT) -> dict[str, Any]:
        name = check_filename(name)
        real_folder = await anyio.to_thread.run_sync(self.roots.resolve, folder)
        if not real_folder.is_dir():
            raise BadRequest(f"folder {folder!r} is not a folder")
        set_id = uuid.uuid4().hex[:20]
        scratch = ScratchCopy(self.storage.incoming, self.settings.max_upload_bytes)
        try:
            await pump(chunks, scratch.receiver, scratch.receiver.write)
            scratch.receiver.digest()
            return await anyio.to_thread.run_sync(self._register, set_id, name, scratch,
                                                  real_folder, project)
        finally:
            scratch.discard()

    async def create_from_part(self, part, folder: str,
                               project: str = DEFAULT_PROJECT) -> dict[str, Any]:
        """The first file part of a multipart body; its name is known once it starts."""
        chunks = part.__aiter__()
        first = await anext(chunks, b"")

        async def rest() -> AsyncIterator[bytes]:
            yield first
            async for chunk in chunks:
                yield chunk
        return await self.create(part.filename or "particles.cs", rest(), folder, project)

    def _register(self, set_id: str, name: str, scratch: ScratchCopy,
                  folder: Path, project: str) -> dict[str, Any]:
        identities: dict[str, dict[str, int]] = {}
        try:
            rows = load_cs(scratch.path)
            pset = open_particle_set(rows, folder, StackOpener(self.roots, identities))
        except MrcError as exc:
            raise from_core(exc) from None
        scratch.keep_as(self.storage.store, cs_key(set_id, name))
        info = {"findings": [f.to_dict() for f in pset.findings],
                "stacks": [{**s.to_dict(), "identity": identities.get(str(s.path))}
                           for s in pset.stacks.values()],
                "fields": [{"name": n, "dtype": str(rows.dtype[n])} for n in rows.dtype.names],
                "usable_rows": int(pset.valid_rows.sum())}
        row = self.catalog.add_particle_set(id=set_id, name=name, folder=str(folder),
                                            rows=len(rows), info=info, project=project)
        self._remember(set_id, pset)
        return row

    def get(self, set_id: str, scope: Scope = Scope.ALL) -> dict[str, Any]:
        """The set, if the caller's ``scope`` reaches its project (else 404)."""
        row = self.catalog.get_particle_set(set_id)
        if row is None or not scope.sees(row.get("project")):
            raise NotFound(f"no particle set {set_id!r}")
        return row

    def _remember(self, set_id: str, pset: ParticleSet) -> None:
        with self._lock:
            self._loaded[set_id] = pset
            self._loaded.move_to_end(set_id)
            while len(self._loaded) > LOADED_SETS:
                self._loaded.popitem(last=False)

    def load(self, set_id: str) -> ParticleSet:
        with self._lock:
            pset = self._loaded.get(set_id)
        if pset is None:
            row = self.get(set_id)
            try:
                raw = self.storage.store.get_bytes(cs_key(set_id, row["name"]))
            except ObjectMissing:
                raise NotFound(f"the .cs file of particle set {set_id} is missing") from None
            recorded = {s["file"]: s["identity"] for s in row["info"].get("stacks", [])
                        if s.get("identity")}
            pset = open_particle_set(load_cs(raw), Path(row["folder"]),
                                     StackOpener(self.roots, recorded, check=True))
            self._remember(set_id, pset)
        return pset

    def particles(self, set_id: str, offset: int, limit: int) -> dict[str, Any]:
        pset = self.load(set_id)
        stop = min(offset + limit, len(pset.rows))
        items = [{"row": k, "usable": bool(pset.valid_rows[k]), **row_dict(pset.rows, k)}
                 for k in range(offset, stop)]
        return {"items": jsonable(items), "total": len(pset.rows),
                "next_offset": stop if stop < len(pset.rows) else None}

    def image_png(self, set_id: str, n: int, size: int, clip: float, encode) -> bytes:
        pset = self.load(set_id)
        try:
            image = pset.image(n)
        except IndexError as exc:
            raise NotFound(str(exc)) from None
        except MrcError as exc:
            raise from_core(exc) from None
        return encode(contrast_u8(binned(image, size), clip, 100 - clip))

    def selection(self, set_id: str, rows: str | None) -> tuple[np.ndarray, str]:
        total = len(self.load(set_id).rows)
        if rows is None:
            return np.arange(total), "all"
        start_text, sep, stop_text = rows.partition(":")
        try:
            start = int(start_text) if start_text else 0
            stop = int(stop_text) if stop_text else total
        except ValueError:
            raise BadRequest(f"rows must look like a:b (0-based, b exclusive), got {rows!r}") \
                from None
        if not sep or not 0 <= start < stop <= total:
            raise BadRequest(f"rows {rows!r} is not a non-empty range within 0:{total}")
        return np.arange(start, stop), f"{start}-{stop}"

    def export(self, set_id: str, rows: str | None) -> tuple[str, str]:
        """The key of the exported stack for ``rows`` (made now if not made before) and
        its download name."""
        row = self.get(set_id)
        selection, label = self.selection(set_id, rows)
        key = f"{particle_set_prefix(set_id)}export-{label}.mrc"
        store = self.storage.store
        if store.size(key) is None:
            try:
                export_stack(self.load(set_id), selection,
                             store.open_writer(key, reserve_head=HEADER_SIZE))
            except MrcError as exc:
                raise from_core(exc) from None
        return key, f"{Path(row['name']).stem}-{label}.mrcs"

    def delete(self, set_id: str) -> None:
        self.get(set_id)
        self.catalog.delete_particle_set(set_id)
        with self._lock:
            self._loaded.pop(set_id, None)
        self.storage.store.delete_prefix(particle_set_prefix(set_id))


class StackOpener:
    """Opens a particle set's stacks inside the roots (:mod:`service.roots`): a link
    inside a root may point inside it, nothing else; each stack's identity is recorded
    when the set is registered (into ``identities``) and, with ``check``, must be the
    same at every later open. A refused stack reads as unreadable (a finding)."""

    def __init__(self, roots: Roots, identities: dict[str, dict[str, int]],
                 check: bool = False):
        self.roots, self.identities, self.check = roots, identities, check

    def __call__(self, path: Path) -> FileSource:
        try:
            real = self.roots.resolve(path)
        except NotFound:
            raise FileNotFoundError(f"no such file: {str(path)!r}") from None
        except PathNotAllowed as exc:
            raise RefusedFile(str(exc.detail)) from None
        opened = self.roots.open_file(real)
        if self.check:
            opened.require_unchanged(self.identities.get(str(path)), f"the stack {str(path)!r}",
                                     "the set was registered", "register the set again")
        else:
            self.identities[str(path)] = opened.identity.to_dict()
        return opened.source()
