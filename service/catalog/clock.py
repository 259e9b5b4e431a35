""""Now" as the database says it, as the catalog's fixed-width ISO 8601 UTC text.

Replicas run on different machines whose clocks drift; a lease that expires "30 seconds
from now" must mean the same instant to all of them, so every time the catalog records
comes from the database (as pgqueuer and river do it: "time is the database's now()"; ARCHITECTURE.md).
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

#: PostgreSQL to_char pattern and SQLite strftime format of the same text form.
_PG_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'
_SQLITE_FORMAT = "%Y-%m-%dT%H:%M:%f"  # %f is SS.SSS: seconds with milliseconds


def db_now(dialect: str, plus_seconds: float | sa.ColumnElement | None = None
           ) -> sa.ColumnElement[str]:
    """SQL for the database's current time (plus ``plus_seconds``) as catalog text."""
    if dialect == "postgresql":
        moment = sa.func.clock_timestamp()
        if plus_seconds is not None:
            moment = moment + sa.func.make_interval(0, 0, 0, 0, 0, 0,
                                                    sa.cast(plus_seconds, sa.Float))
        return sa.func.to_char(sa.func.timezone("UTC", moment), _PG_FORMAT)
    if dialect == "sqlite":
        if plus_seconds is None:
            modifier = sa.literal("+0 seconds")
        elif isinstance(plus_seconds, (int, float)):  # signed: "+-1 seconds" is no time
            modifier = sa.literal(f"{float(plus_seconds):+.6f} seconds")
        else:
            modifier = sa.literal("+").concat(sa.cast(plus_seconds, sa.Text)).concat(
                " seconds")
        # SQLite keeps milliseconds; pad to the microsecond width of the other rows.
        return sa.func.strftime(_SQLITE_FORMAT, "now", modifier).concat("000+00:00")
    raise ValueError(f"no clock for the {dialect} dialect")


def text_now() -> str:
    """This machine's time in the same text form: for tools that insert many rows at
    once (benchmarks, tests), never for the service's own records."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
