"""Every way a movie arrives, and the one commit protocol they all end in
(ARCHITECTURE.md): :class:`IngestPass` cuts, archives and proves the bytes as they come;
:mod:`.protocol` owns the order stored -> committed -> released; :mod:`.recovery` runs
the same protocol again from what the catalog says after a crash, an outage or a lost
lease. Nothing outside this package deletes received bytes or a pass's objects."""

from .ingest_pass import IngestPass, drop_receiving
from .protocol import PassBytes, PassDeps, ReceivedBytes, frame_slots

__all__ = ["IngestPass", "PassBytes", "PassDeps", "ReceivedBytes", "drop_receiving",
           "frame_slots"]
