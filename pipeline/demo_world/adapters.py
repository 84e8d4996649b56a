"""Small valid adapter directories with seeded bytes, for registry tests and the registry screenshot.

They are PEFT-shaped (config + safetensors) but do not fit any real model: what a registry stores,
verifies and hands back does not depend on the weights making sense.
"""

from __future__ import annotations

from pathlib import Path


def make_adapter_dir(directory: Path, seed: int = 0, *, base_model: str = "tiny-model") -> Path:
    """A small valid PEFT-style adapter directory (config + safetensors) whose bytes depend on `seed`."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model_name_or_path": base_model,
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, sort_keys=True), encoding="utf-8")
    rng = np.random.default_rng(seed)
    tensors = {
        f"base_model.model.layers.0.self_attn.{module}.lora_{side}.weight": rng.standard_normal(
            (4, 16) if side == "A" else (16, 4)
        ).astype(np.float32)
        for module in ("q_proj", "v_proj")
        for side in ("A", "B")
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory
