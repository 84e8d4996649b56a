"""The interaction store: schema, migrations, idempotent writes and streaming harvest reads.

Applications log interactions with `log_interaction` / `log_interactions` on an engine from
`connect(url)`; the pipeline reads them back with the functions in `storage.reads`.
"""

from sqlalchemy import Engine

from storage.engine import make_engine, safe_url
from storage.errors import InvalidRecord, SchemaNotReady, UserError
from storage.migrate import require_current, upgrade
from storage.records import Feedback, InteractionRecord, Message, parse_record
from storage.writes import IngestReport, ingest_jsonl, log_feedback, log_interaction, log_interactions


def connect(url: str, *, echo: bool = False, check_schema: bool = True) -> Engine:
    """An engine on the store at `url`, checked to connect and (by default) to be at the current schema."""
    engine = make_engine(url, echo=echo)
    if check_schema:
        require_current(engine)
    return engine


__all__ = [
    "Feedback",
    "IngestReport",
    "InteractionRecord",
    "InvalidRecord",
    "Message",
    "SchemaNotReady",
    "UserError",
    "connect",
    "ingest_jsonl",
    "log_feedback",
    "log_interaction",
    "log_interactions",
    "make_engine",
    "parse_record",
    "require_current",
    "safe_url",
    "upgrade",
]
