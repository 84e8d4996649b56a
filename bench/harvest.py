"""Harvest benchmark on PostgreSQL: throughput against a plain psycopg read, memory growth, ingest speed.

Measured side by side in one run, on one database:
  - ingest rows/s through `storage.log_interactions` (validation + idempotent batched inserts);
  - a plain psycopg read of the same rows (the same query, a server-side cursor), rows/s;
  - harvest rows/s without redaction (ratio to the plain read; target >= 0.5) and with redaction;
  - peak RSS of a harvest of 100k rows vs 1M rows, each in a fresh process (target growth < 1.2x).

    .venv/bin/python bench/harvest.py [--rows 1000000] [--url postgresql+psycopg://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from sqlalchemy import create_engine, text

import storage
from pipeline.config import HarvestConfig, TrackFilter
from pipeline.demo_world.synthetic_traffic import generate_records
from pipeline.harvest.stage import harvest

BENCH_DB = "overnight_bench"
TEMPLATES = 20_000  # distinct generated records, varied to make every row unique

KEY = b"test-pseudonym-key-0123456789"  # the keyed pseudonyms of user ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large track")
    parser.add_argument(
        "--small", type=int, default=100_000, help="rows of the small track (memory baseline)"
    )
    parser.add_argument(
        "--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", help="admin URL"
    )
    parser.add_argument("--reuse", action="store_true", help="keep an existing benchmark database")
    parser.add_argument("--child", nargs=2, metavar=("URL", "TRACK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child_rss(*args.child)
    url = _fresh_database(args.url, keep=args.reuse)
    engine = storage.make_engine(url)
    storage.upgrade(engine)
    figures: dict[str, Any] = {"rows": args.rows, "small_rows": args.small}
    if not args.reuse:
        figures["ingest_rows_per_s"] = _ingest(engine, "big", args.rows)
        _ingest(engine, "small", args.small)
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))
    figures["plain_read_rows_per_s"] = _plain_read(url, "big", args.rows)
    figures["harvest_rows_per_s"] = _harvest(engine, "big", redact=False)
    figures["harvest_redacted_rows_per_s"] = _harvest(engine, "big", redact=True)
    figures["harvest_vs_plain_read"] = figures["harvest_rows_per_s"] / figures["plain_read_rows_per_s"]
    figures["redaction_cost_us_per_row"] = 1e6 * (
        1 / figures["harvest_redacted_rows_per_s"] - 1 / figures["harvest_rows_per_s"]
    )
    figures["peak_rss_mb_small"] = _rss_in_child(url, "small")
    figures["peak_rss_mb_big"] = _rss_in_child(url, "big")
    figures["rss_growth"] = figures["peak_rss_mb_big"] / figures["peak_rss_mb_small"]
    _report(figures)


def _fresh_database(admin_url: str, *, keep: bool) -> str:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": BENCH_DB})
        if exists and not keep:
            connection.execute(text(f"DROP DATABASE {BENCH_DB} WITH (FORCE)"))
        if not exists or not keep:
            connection.execute(text(f"CREATE DATABASE {BENCH_DB}"))
    return admin.url.set(database=BENCH_DB).render_as_string(hide_password=False)


def _records(track: str, n: int) -> Iterator[dict[str, Any]]:
    """`n` unique records: generated templates, each reused with its own id, time, user and prompt suffix."""
    templates = list(generate_records(min(n, TEMPLATES), seed=7, id_fraction=1.0))
    for i in range(n):
        base = templates[i % len(templates)]
        messages = [dict(m) for m in base["messages"]]
        messages[-1]["content"] += f" (ticket {i})"
        yield {
            **base,
            "id": f"{track}-{i}",
            "track": track,
            "user_id": f"{base['user_id']}-{i % 5000}",
            "messages": messages,
            "consent": True,
        }


def _ingest(engine: Any, track: str, n: int) -> float:
    start = time.perf_counter()
    report = storage.log_interactions(engine, _records(track, n), batch_size=2000)
    seconds = time.perf_counter() - start
    assert report.accepted == n, report.as_json()
    print(f"ingested {n:,} rows of {track} in {seconds:.1f}s", file=sys.stderr)
    return n / seconds


def _plain_read(url: str, track: str, expected: int) -> float:
    """The same rows and columns as harvest reads, through psycopg alone (server-side cursor)."""
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    query = """
        SELECT i.id, i.client_id, i.ts, i.track, i.user_id, i.session_id, i.messages, i.response, i.model,
               i.metadata, i.consent, f.thumb, f.rating, f.comment
        FROM interactions i
        LEFT JOIN (SELECT interaction_id, max(id) AS feedback_id FROM feedback GROUP BY interaction_id) l
               ON l.interaction_id = i.id
        LEFT JOIN feedback f ON f.id = l.feedback_id
        WHERE i.track = %s AND i.id > 0 ORDER BY i.id"""
    start = time.perf_counter()
    rows = 0
    with psycopg.connect(dsn) as connection, connection.cursor(name="plain") as cursor:
        cursor.itersize = 2000
        cursor.execute(query, (track,))
        for _ in cursor:
            rows += 1
    seconds = time.perf_counter() - start
    assert rows == expected, rows
    return rows / seconds


def _harvest(engine: Any, track: str, *, redact: bool) -> float:
    settings = HarvestConfig(redact_pii=redact, max_rows_per_user=10**9, max_chars=10**9)
    start = time.perf_counter()
    result = harvest(engine, track, settings, TrackFilter(), batch_size=2000, pseudonym_key=KEY)
    seconds = time.perf_counter() - start
    print(f"harvest {track} redact={redact}: {result.rows_read:,} rows in {seconds:.1f}s", file=sys.stderr)
    return result.rows_read / seconds


def _rss_in_child(url: str, track: str) -> float:
    output = subprocess.run(
        [sys.executable, __file__, "--child", url, track], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mb"]


def _child_rss(url: str, track: str) -> None:
    engine = storage.make_engine(url)
    result = harvest(engine, track, HarvestConfig(), TrackFilter(), batch_size=2000, pseudonym_key=KEY)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": result.rows_read, "peak_rss_mb": round(peak, 1)}))


def _report(figures: dict[str, Any]) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}, indent=2))
    print(
        f"\nharvest {figures['harvest_rows_per_s']:,.0f} rows/s vs plain psycopg read "
        f"{figures['plain_read_rows_per_s']:,.0f} rows/s: ratio {figures['harvest_vs_plain_read']:.2f} (target >= 0.5)"
    )
    print(
        f"with redaction {figures['harvest_redacted_rows_per_s']:,.0f} rows/s "
        f"(+{figures['redaction_cost_us_per_row']:.1f} us/row)"
    )
    print(
        f"peak RSS {figures['peak_rss_mb_small']:.0f} MB at {figures['small_rows']:,} rows vs "
        f"{figures['peak_rss_mb_big']:.0f} MB at {figures['rows']:,} rows: {figures['rss_growth']:.2f}x (target < 1.2x)"
    )
    if "ingest_rows_per_s" in figures:
        print(f"ingest {figures['ingest_rows_per_s']:,.0f} rows/s")


if __name__ == "__main__":
    main()
