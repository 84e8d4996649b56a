"""A LoRA adapter directory as something that can be trusted: complete, loadable and the bytes it claims.

Training writes adapter directories; the registry stores them; serving loads them into vLLM. Between
any two of those steps a file can be truncated, replaced or half-copied, and vLLM's own error for a
bad adapter arrives late (after the swap began) and says little. So every consumer checks an adapter
here first: the PEFT config has what vLLM needs, every safetensors file parses to the end (a
truncated file fails here, before it reaches a server), and the directory digest equals the one
recorded when the adapter was produced.

The directory digest is one sha256 over the sorted `(relative path, file sha256)` pairs, so it
changes when any file's bytes change, a file is added or removed, or a file is renamed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import UserError

__all__ = [
    "AdapterInvalid",
    "AdapterVersion",
    "adapter_sha256",
    "check_adapter_dir",
    "digest_of",
    "file_digests",
    "file_sha256",
    "verify_adapter",
]

REQUIRED_CONFIG_KEYS = ("base_model_name_or_path", "r", "lora_alpha", "target_modules")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class AdapterInvalid(UserError):
    """An adapter directory is incomplete, corrupt or not the one recorded."""


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version of a track's adapter, as a verified local directory."""

    track: str
    version: int  # the registry's version number
    path: Path  # local adapter directory (PEFT, safetensors), checked by `verify_adapter`
    sha256: str  # the directory digest recorded when the version was registered

    @property
    def pinned_name(self) -> str:
        """The serving name that always means this version: `<track>@v<N>`."""
        return f"{self.track}@v{self.version}"


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, keyed by relative POSIX path."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return {path.relative_to(directory).as_posix(): file_sha256(path) for path in files}


def digest_of(digests: dict[str, str]) -> str:
    """The directory digest of per-file digests (see the module docstring)."""
    lines = "".join(f"{name}\t{digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def adapter_sha256(directory: Path) -> str:
    """The directory digest of an adapter directory."""
    return digest_of(file_digests(directory))


def check_adapter_dir(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's PEFT config, after checking it has what vLLM needs and its weights parse whole.

    Raises `AdapterInvalid` naming the directory and what is wrong.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterInvalid(f"{adapter_dir}: adapter directory not found")
    config_file = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterInvalid(f"{adapter_dir}: no {CONFIG_FILE} (not a PEFT adapter)") from None
    except (OSError, ValueError) as error:
        raise AdapterInvalid(f"{config_file}: unreadable adapter config: {error}") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{config_file}: adapter config must be a JSON object")
    missing = [key for key in REQUIRED_CONFIG_KEYS if not config.get(key)]
    if missing:
        raise AdapterInvalid(f"{config_file}: missing {', '.join(missing)}")
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterInvalid(f"{adapter_dir}: no {WEIGHTS_FILE}")
    _check_safetensors(weights)
    return config


def verify_adapter(adapter_dir: Path, expected_sha256: str) -> dict[str, Any]:
    """`check_adapter_dir`, then the directory digest must equal `expected_sha256`."""
    config = check_adapter_dir(adapter_dir)
    actual = adapter_sha256(Path(adapter_dir))
    if actual != expected_sha256:
        raise AdapterInvalid(
            f"{adapter_dir}: sha256 mismatch (recorded {expected_sha256[:12]}…, files give {actual[:12]}…): "
            "the adapter was modified or corrupted after it was recorded"
        )
    return config


def _check_safetensors(path: Path) -> None:
    """The header parses and every tensor's byte range lies inside the file (a truncated file fails)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise AdapterInvalid(f"{path}: truncated safetensors file ({size} bytes)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise AdapterInvalid(f"{path}: truncated safetensors file (header claims {header_length} bytes)")
        try:
            header = json.loads(file.read(header_length))
        except ValueError:
            raise AdapterInvalid(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise AdapterInvalid(f"{path}: corrupt safetensors header")
    data_length = size - 8 - header_length
    end = max(
        (info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"),
        default=0,
    )
    if end > data_length:
        raise AdapterInvalid(
            f"{path}: truncated safetensors file (tensors need {end} bytes of data, file has {data_length})"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
