"""pipeline.adapters: file digests (hashlib.file_digest) and weights validation (safetensors.safe_open)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.adapters import (
    WEIGHTS_FILE,
    AdapterInvalid,
    adapter_sha256,
    check_adapter_dir,
    file_digests,
    file_sha256,
    verify_adapter,
)
from pipeline.demo_world.adapters import make_adapter_dir


def _safetensors(header: dict[str, object], data: bytes) -> bytes:
    """A safetensors file written by hand, so that it can be wrong on purpose."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _tensor(dtype: str, shape: list[int], size: int) -> dict[str, object]:
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}}


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    for name, data in {"empty": b"", "small": b"adapter", "big": bytes(range(256)) * 9000}.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_directory_digest_changes_with_any_file_and_name(tmp_path: Path) -> None:
    adapter = make_adapter_dir(tmp_path / "a", seed=1)
    digest = adapter_sha256(adapter)
    assert set(file_digests(adapter)) == {"adapter_config.json", WEIGHTS_FILE}
    assert verify_adapter(adapter, digest)["r"] == 4
    (adapter / "README.md").write_text("notes", encoding="utf-8")
    renamed = adapter_sha256(adapter)
    (adapter / "README.md").rename(adapter / "NOTES.md")
    assert len({digest, renamed, adapter_sha256(adapter)}) == 3
    with pytest.raises(AdapterInvalid, match="sha256 mismatch"):
        verify_adapter(adapter, digest)


CORRUPT: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (lambda good: good[:-10], "corrupt or truncated"),
    "padded": (lambda good: good + b"\0" * 8, "corrupt or truncated"),
    "empty file": (lambda good: b"", "corrupt or truncated"),
    "header past the end": (lambda good: good[:40], "corrupt or truncated"),
    "header not JSON": (lambda good: struct.pack("<Q", 8) + b"{nojson}", "corrupt or truncated"),
    "shape disagrees with bytes": (
        lambda good: _safetensors(_tensor("F32", [4, 4], 32), b"\0" * 32),
        "corrupt or truncated",
    ),
    "no tensors": (lambda good: _safetensors({}, b""), "no tensors"),
    "integer weights": (lambda good: _safetensors(_tensor("I32", [2, 2], 16), b"\0" * 16), "dtype I32"),
    "empty tensor": (lambda good: _safetensors(_tensor("F32", [0, 4], 0), b""), "empty shape"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_bad_weights_file_is_refused_with_one_line(case: str, tmp_path: Path) -> None:
    adapter = make_adapter_dir(tmp_path / "a")
    weights = adapter / WEIGHTS_FILE
    corrupt, expected = CORRUPT[case]
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(AdapterInvalid, match=expected) as caught:
        check_adapter_dir(adapter)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{weights}: ")


def test_bfloat16_weights_are_accepted(tmp_path: Path) -> None:
    adapter = make_adapter_dir(tmp_path / "a")
    (adapter / WEIGHTS_FILE).write_bytes(_safetensors(_tensor("BF16", [2, 4], 16), b"\0" * 16))
    assert check_adapter_dir(adapter)["lora_alpha"] == 8


def test_a_config_without_what_vllm_needs_is_refused(tmp_path: Path) -> None:
    adapter = make_adapter_dir(tmp_path / "a")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}), encoding="utf-8")
    with pytest.raises(AdapterInvalid, match="missing base_model_name_or_path, lora_alpha, target_modules"):
        check_adapter_dir(adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterInvalid, match="not a PEFT adapter"):
        check_adapter_dir(adapter)
