"""Keyed pseudonyms: stable with the key, not reproducible without it, the key kept owner-only."""

import hashlib
import stat
import threading
from pathlib import Path

import pytest

from pipeline.harvest.pseudonyms import KEY_FILE, pseudonym, pseudonym_key
from storage.errors import UserError


def test_a_pseudonym_is_stable_with_the_key_and_differs_under_another_key() -> None:
    key, other = b"k" * 32, b"o" * 32

    assert pseudonym("u-1729", key) == pseudonym("u-1729", key)
    assert pseudonym("u-1729", key) != pseudonym("u-1729", other)
    assert pseudonym("u-1729", key) != pseudonym("u-1730", key)


def test_a_guessable_id_cannot_be_recovered_by_hashing_candidates_without_the_key(tmp_path: Path) -> None:
    key = pseudonym_key(None, tmp_path)
    target = pseudonym("u-1729", key)
    candidates = [f"u-{n}" for n in range(5000)]

    # What the old, unkeyed pseudonym allowed: hash every candidate id and compare.
    unkeyed = {
        "u_" + hashlib.blake2b(c.encode(), digest_size=8, person=b"overnight-user").hexdigest()
        for c in candidates
    }
    guessed_keys = [b"", b"overnight", b"0" * 32]
    keyed_guesses = {pseudonym(c, guess) for c in candidates for guess in guessed_keys}

    assert target not in unkeyed and target not in keyed_guesses
    assert pseudonym("u-1729", pseudonym_key(None, tmp_path)) == target  # the stored key reproduces it


def test_the_generated_key_is_stored_once_with_owner_only_permissions(tmp_path: Path) -> None:
    first = pseudonym_key(None, tmp_path)
    path = tmp_path / KEY_FILE

    assert len(first) == 32 and pseudonym_key(None, tmp_path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_configured_key_wins_and_a_short_one_is_refused(tmp_path: Path) -> None:
    configured = pseudonym_key("a-long-enough-secret-key", tmp_path)
    assert configured == pseudonym_key("a-long-enough-secret-key", tmp_path) != pseudonym_key(None, tmp_path)
    assert pseudonym("u-1", pseudonym_key("x" * 500, tmp_path))  # a key longer than BLAKE2b's 64 bytes works
    with pytest.raises(UserError, match="pseudonym_key: too short"):
        pseudonym_key("short", tmp_path)


def test_a_damaged_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.parent.mkdir(parents=True)
    path.write_text("not hex at all\n", encoding="ascii")

    with pytest.raises(UserError, match="unreadable pseudonym key"):
        pseudonym_key(None, tmp_path)


def test_concurrent_first_uses_agree_on_one_key(tmp_path: Path) -> None:
    """Tracks harvest at once on the first night: every caller gets the one stored key, none fails."""
    keys: list[bytes] = []
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            keys.append(pseudonym_key(None, tmp_path))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == [] and len(set(keys)) == 1
    assert keys[0] == pseudonym_key(None, tmp_path)
    assert [p.name for p in (tmp_path / KEY_FILE).parent.iterdir()] == ["pseudonym.key"]  # no scratch left
