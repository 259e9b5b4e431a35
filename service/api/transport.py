"""uvicorn's httptools protocol, with a request body kept as the chunks that arrived.

uvicorn gathers a request body in a ``bytearray`` (``+=``: a copy of every byte) and
hands it to the application as ``bytes(bytearray)`` (a second copy), both on the event
loop, holding the GIL. While eight uploads streamed into one ``serve``, 77 % of the
samples in which some thread held the GIL were the event loop's, most of them in those
two copies and the parsing around them (``py-spy record --gil``); every dashboard
request waited behind them. Here the body is the list of chunks as httptools gave them:
a single chunk -- the usual case, one per socket read -- reaches the application as it
is, several are joined once. Everything else is uvicorn's own protocol.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class Chunks:
    """What uvicorn's request cycle needs of its body buffer: ``+=`` a chunk, ``len``,
    and ``bytes()`` of it all."""

    __slots__ = ("parts", "size")

    def __init__(self, first: bytes = b"") -> None:
        self.parts: list[bytes] = [first] if first else []
        self.size = len(first)

    def __iadd__(self, chunk: bytes) -> "Chunks":
        if chunk:
            self.parts.append(bytes(chunk))  # httptools gives bytes: no copy then
            self.size += len(chunk)
        return self

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class ChunkedBodyHttpTools(HttpToolsProtocol):
    """``uvicorn.run(..., http=ChunkedBodyHttpTools)``."""

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if not isinstance(cycle.body, Chunks):  # a new request, or one just read out
            cycle.body = Chunks(bytes(cycle.body))
        super().on_body(body)
