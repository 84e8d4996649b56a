"""Gateway API keys, stored hashed, and which key made an interaction.

A key is a random `ovn-...` string returned once by `create_api_key`; only its sha256 is stored, so a
copy of the database gives no working key. Keys are looked up by that hash (`find_api_key`); a revoked
key is as good as unknown. The key that made an interaction is written by the gateway into the
interaction's metadata (`metadata.gateway.key`, its name, never the key), and `interaction_owner`
reads it back so feedback is only taken from the key that made the interaction (an interaction made
without a key, or not through the gateway, takes feedback only from callers without a key).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.errors import UserError
from storage.models import ApiKey, Interaction, utc_now

__all__ = [
    "KEY_PREFIX",
    "InteractionOwner",
    "create_api_key",
    "find_api_key",
    "interaction_owner",
    "key_sha256",
    "list_api_keys",
    "new_key",
    "revoke_api_key",
]

KEY_PREFIX = "ovn-"
MAX_NAME_CHARS = 100


def new_key() -> str:
    """A fresh random key: `ovn-` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(
    engine: Engine,
    name: str,
    tracks: Sequence[str] = ("*",),
    *,
    consent_default: bool = True,
    store_traffic: bool = True,
) -> str:
    """Store a new key allowed `tracks` (`["*"]`: all) and return it in clear: the only time it is shown."""
    if not name or len(name) > MAX_NAME_CHARS:
        raise UserError(f"api key name must be 1-{MAX_NAME_CHARS} characters, got {name!r}")
    if not tracks:
        raise UserError(f"api key {name!r}: give at least one track (or '*' for all)")
    key = new_key()
    row = ApiKey(
        name=name,
        key_sha256=key_sha256(key),
        tracks=list(tracks),
        consent_default=consent_default,
        store_traffic=store_traffic,
        created_at=utc_now(),
    )
    try:
        with Session(engine) as session, session.begin():
            session.add(row)
    except IntegrityError:
        raise UserError(f"an api key named {name!r} already exists") from None
    return key


def find_api_key(engine: Engine, key: str) -> ApiKey | None:
    """The key's row (detached, read-only) by the key's sha256; None when unknown or revoked."""
    with Session(engine, expire_on_commit=False) as session:
        row = session.scalars(
            select(ApiKey).where(ApiKey.key_sha256 == key_sha256(key), ApiKey.revoked_at.is_(None))
        ).first()
        session.expunge_all()
    return row


def list_api_keys(engine: Engine, *, include_revoked: bool = False) -> list[ApiKey]:
    """Every key's row (detached, read-only; the hash, never a key), oldest first."""
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with Session(engine, expire_on_commit=False) as session:
        rows = list(session.scalars(query))
        session.expunge_all()
    return rows


def revoke_api_key(engine: Engine, name: str) -> bool:
    """Revoke the key named `name`; False when there is no such live key."""
    with engine.begin() as connection:
        result = connection.execute(
            update(ApiKey)
            .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utc_now())
        )
    return result.rowcount == 1


@dataclass(frozen=True)
class InteractionOwner:
    key_name: str | None  # the key that made it; None: made without one, or not through the gateway


def interaction_owner(engine: Engine, interaction_id: str) -> InteractionOwner | None:
    """Who made the interaction logged with client id `interaction_id`; None when it is not stored."""
    with engine.connect() as connection:
        row = connection.execute(
            select(Interaction.metadata_).where(Interaction.dedup_key == f"id:{interaction_id}")
        ).first()
    if row is None:
        return None
    gateway = (row[0] or {}).get("gateway")
    key = gateway.get("key") if isinstance(gateway, dict) else None
    return InteractionOwner(key if isinstance(key, str) else None)
