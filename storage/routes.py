"""The route table: which pinned adapter each track's stable name serves, shared by every gateway.

A deploy loads the new version under its pinned name everywhere, then flips the route; a rollback is
the same flip toward an older version. The flip is one INSERT ... ON CONFLICT DO UPDATE statement, so
it is atomic on SQLite and PostgreSQL alike, two racing flips never lose the previous version, and
gateway processes polling `read_routes` see the old route or the new one, never half of each.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine, case, false, select
from sqlalchemy.orm import Session

from storage.models import Deployment, Route, utc_now
from storage.writes import dialect_insert

__all__ = ["ANY_ROUTE", "RouteMoved", "flip_route", "read_routes"]

ANY_ROUTE = "<any>"  # `expected` of an unconditional flip (seeding routes from the registry)


class RouteMoved(Exception):
    """The route no longer points where the flip expected: another deploy or rollback moved it."""


def flip_route(
    engine: Engine,
    track: str,
    version: str,
    adapter_name: str,
    *,
    expected: str | None = ANY_ROUTE,
    deployments: Sequence[Deployment] = (),
) -> Route:
    """Point `track` at `adapter_name` (version `version`), keeping what it served as `previous_version`.

    `expected`: the adapter name the route must point at for the flip to happen (None: no route yet);
    otherwise nothing is written and `RouteMoved` is raised, so two deploys or a deploy and a rollback
    of one track in different processes never flip over each other unseen. Flipping to the version
    already served changes nothing but `updated_at` (a re-run after a crash). `deployments` rows are
    written in the same transaction: the flip and its record happen together or not at all.
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():  # rows keep their ids
        insert = dialect_insert(session.connection(), Route)
        table = Route.__table__
        statement = insert.values(
            track=track,
            version=version,
            adapter_name=adapter_name,
            previous_version=None,
            updated_at=utc_now(),
        ).on_conflict_do_update(
            index_elements=["track"],
            set_={
                "previous_version": case(
                    (table.c.version == insert.excluded.version, table.c.previous_version),
                    else_=table.c.version,
                ),
                "version": insert.excluded.version,
                "adapter_name": insert.excluded.adapter_name,
                "updated_at": insert.excluded.updated_at,
            },
            where=None
            if expected == ANY_ROUTE
            else (false() if expected is None else table.c.adapter_name == expected),
        )
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT through SQLAlchemy
        if session.connection().execute(statement.returning(table.c.track)).first() is None:
            raise RouteMoved(
                f"the route of {track} moved while this deploy ran (expected {expected or 'none'})"
            )
        session.add_all(deployments)
    return read_routes(engine)[track]


def read_routes(engine: Engine) -> dict[str, Route]:
    """Every track's route (detached rows, read-only), by track."""
    with Session(engine, expire_on_commit=False) as session:
        rows = session.scalars(select(Route)).all()
        session.expunge_all()
    return {row.track: row for row in rows}
