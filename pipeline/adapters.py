"""A LoRA adapter directory as something that can be trusted: complete, loadable and the bytes it claims.

Training writes adapter directories; the registry stores them; serving loads them into vLLM. Between
any two of those steps a file can be truncated, replaced or half-copied, and vLLM's own error for a
bad adapter arrives late (after the swap began) and says little. So every consumer checks an adapter
here first: the PEFT config has what vLLM needs, the weights file opens whole, and the directory
digest equals the one recorded when the adapter was produced.

From libraries: `safetensors.safe_open` reads and validates the weights file (header length and JSON,
every tensor's dtype, shape and byte range, the data covering the file exactly, so a truncated or
padded file fails) without loading a tensor; `hashlib.file_digest` hashes a file. By hand, because no
library says it: which PEFT config keys vLLM needs, that an adapter holds at least one non-empty
floating-point tensor, the directory digest, and one-line `AdapterInvalid` messages.

The directory digest is one sha256 over the sorted `(relative path, file sha256)` pairs, so it
changes when any file's bytes change, a file is added or removed, or a file is renamed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

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
FLOAT_DTYPE_PREFIXES = ("F", "BF")  # safetensors dtype names: F16, BF16, F32, F64, F8_E4M3, ...


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


def file_sha256(path: Path) -> str:
    """sha256 hex of one file's bytes."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


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
    """The adapter's PEFT config, after checking it has what vLLM needs and its weights open whole.

    Raises `AdapterInvalid` naming the directory and what is wrong.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterInvalid(f"{adapter_dir}: adapter directory not found")
    config = _read_config(adapter_dir / CONFIG_FILE)
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


def _read_config(config_file: Path) -> dict[str, Any]:
    """The PEFT config as a JSON object holding every key in `REQUIRED_CONFIG_KEYS`."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterInvalid(f"{config_file.parent}: no {CONFIG_FILE} (not a PEFT adapter)") from None
    except (OSError, ValueError) as error:
        raise AdapterInvalid(f"{config_file}: unreadable adapter config: {error}") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{config_file}: adapter config must be a JSON object")
    missing = [key for key in REQUIRED_CONFIG_KEYS if not config.get(key)]
    if missing:
        raise AdapterInvalid(f"{config_file}: missing {', '.join(missing)}")
    return config


def _check_safetensors(path: Path) -> None:
    """safetensors opens the file (it validates header, dtypes, shapes and offsets); then it must hold
    at least one tensor, each floating point with no empty dimension."""
    try:
        with safe_open(path, framework="numpy") as weights:
            slices = [(name, weights.get_slice(name)) for name in weights.keys()]  # noqa: SIM118
            specs = sorted((name, part.get_dtype(), part.get_shape()) for name, part in slices)
    except (SafetensorError, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise AdapterInvalid(f"{path}: corrupt or truncated safetensors file: {reason}") from None
    if not specs:
        raise AdapterInvalid(f"{path}: no tensors in the weights file")
    for name, dtype, shape in specs:
        if not dtype.startswith(FLOAT_DTYPE_PREFIXES):
            raise AdapterInvalid(f"{path}: tensor {name} has dtype {dtype}, LoRA weights are floating point")
        if not shape or 0 in shape:
            raise AdapterInvalid(f"{path}: tensor {name} has empty shape {shape}")
