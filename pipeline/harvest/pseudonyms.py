"""Keyed pseudonyms for user ids in training data, and the key they are made with.

Why keyed: an unkeyed hash of a guessable id (`u-1729`, an email) is reversed by hashing candidates.
BLAKE2b in keyed mode (a MAC, RFC 7693) with a secret the attacker lacks makes a pseudonym
reproducible only by whoever holds the key, while the same user keeps the same pseudonym night after
night (per-user caps and dedup rely on that). The key comes from config (`privacy.pseudonym_key`, or
`OVERNIGHT_PRIVACY__PSEUDONYM_KEY`); when none is set, one is generated on first use and stored
under `home` (`secrets/pseudonym.key`, owner-only permissions), so it survives restarts.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import tempfile
from pathlib import Path

from storage.errors import UserError

__all__ = ["KEY_FILE", "pseudonym", "pseudonym_key"]

KEY_FILE = Path("secrets") / "pseudonym.key"
KEY_BYTES = 32  # BLAKE2b takes keys up to 64 bytes
MIN_KEY_CHARS = 16  # a configured key shorter than this is refused as guessable


def pseudonym_key(configured: str | None, home: str | Path) -> bytes:
    """The configured key, else the one stored under `home`, else a new one stored there (0600)."""
    if configured is not None:
        if len(configured) < MIN_KEY_CHARS:
            raise UserError(
                f"privacy.pseudonym_key: too short ({len(configured)} characters; use {MIN_KEY_CHARS}+)"
            )
        return hashlib.sha256(
            configured.encode()
        ).digest()  # any length in; BLAKE2b keys are 64 bytes at most
    path = Path(home) / KEY_FILE
    if path.exists():
        return _read_key(path)
    return _create_key(path)


def _read_key(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path}: unreadable pseudonym key ({error}); restore it or set privacy.pseudonym_key"
        ) from None
    if not key:
        raise UserError(f"{path}: empty pseudonym key; restore it or set privacy.pseudonym_key")
    return key


def _create_key(path: Path) -> bytes:
    """A new random key, written atomically with owner-only permissions; a racing writer's key wins.

    Tracks harvest concurrently (threads of one process) and nights may run in several processes, so
    the scratch file has a unique name (mkstemp, 0600) and the key appears by an atomic hard link.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(KEY_BYTES)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    scratch = Path(name)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(key.hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(scratch, path)  # fails if another process stored its key first: use that one
    except FileExistsError:
        return _read_key(path)
    finally:
        scratch.unlink()
    return key


@functools.lru_cache(maxsize=65536)
def pseudonym(user_id: str, key: bytes) -> str:
    """A stable stand-in for a user id (which may itself be an email), reproducible only with `key`."""
    return (
        "u_" + hashlib.blake2b(user_id.encode(), digest_size=8, key=key, person=b"overnight-user").hexdigest()
    )
