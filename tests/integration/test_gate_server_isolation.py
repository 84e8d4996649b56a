"""The gate's base replies through the real vLLM CPU server stay the base's while adapters are served.

vLLM's CPU LoRA kernels (`vllm/lora/ops/torch_ops/lora_ops.py`) pick each token's adapter weights with
`lora_b_weights[lora_indices_tensor]`, and a token of a request without an adapter has index -1, which
Python indexing turns into the LAST adapter slot (`max_loras - 1`). The kernels are skipped only when
no token of the batch has an adapter (`punica_wrapper/utils.py::compute_meta`, `no_lora`), and a slot
keeps its weights after its adapter is unloaded or evicted. So once every slot has been used, a base
request batched with any adapter request (another track's gate, a user of a served track) is answered
with the last slot's adapter: the demo's night-2 gate scored the base champion exactly as the
candidate. Prefix caching plays no part (the same happens with it off). The gate therefore asks the
base through a temporary all-zero adapter (`ServerGenerator`), whose slot adds exactly nothing.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline.deploy.vllm_client import VllmClient
from pipeline.gate.generation import Decoding, ServerGenerator
from tests.serving_fixtures import make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS: Any = [
    [{"role": "user", "content": f"Question {i}: where is my order #{1000 + 37 * i}?"}] for i in range(16)
]
DECODING = Decoding(max_new_tokens=16)
SLOTS = 4  # the fixture's ServerSpec.max_loras


def differing(left: list[str], right: list[str]) -> int:
    return sum(a != b for a, b in zip(left, right, strict=True))


def test_base_replies_are_the_base_s_while_another_adapter_is_asked_at_the_same_time(
    vllm_server: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # One more distinct adapter than there are slots: the fillers leave every slot holding a
    # non-zero adapter (the last one included), `other` is the other track's gate.
    adapters = [make_adapter(tiny_model_dir, tmp_path / f"adapter-{seed}", seed=seed) for seed in range(6)]
    *fillers, candidate, other = adapters
    client = VllmClient(vllm_server.base_url, timeout_seconds=300)
    before = set(client.adapters())
    served_base = vllm_server.spec.served_name
    base = client.chat_many(served_base, PROMPTS, max_tokens=DECODING.max_new_tokens)  # alone: the truth
    generator = ServerGenerator(client, base_name=served_base)
    for filler in fillers[:SLOTS]:
        assert differing(generator.replies(filler, PROMPTS[:4], DECODING), base[:4]) > 0

    # The gate: the candidate first, then the base (the champion before a first promotion), while
    # another track's gate keeps asking its own adapter on the same server.
    candidate_replies = generator.replies(candidate, PROMPTS, DECODING)
    other_name = f"other-{uuid.uuid4().hex[:8]}"
    client.load_adapter(other_name, str(other))
    done, rounds = threading.Event(), []

    def other_gate() -> None:
        while not done.is_set() or not rounds:
            client.chat_many(other_name, PROMPTS, max_tokens=DECODING.max_new_tokens)
            rounds.append(1)

    thread = threading.Thread(target=other_gate)
    thread.start()
    try:
        champion_replies = generator.replies(None, PROMPTS, DECODING)
    finally:
        done.set()
        thread.join()
        client.unload_adapter(other_name)

    assert differing(candidate_replies, base) > 0  # the candidate does answer differently
    assert differing(champion_replies, base) == 0, (
        f"{differing(champion_replies, base)} of {len(PROMPTS)} base replies changed while another "
        f"adapter was asked; {len(PROMPTS) - differing(champion_replies, candidate_replies)} equal the "
        "candidate's"
    )
    # Alone again, the base still answers as before; no temporary name or zero adapter is left.
    assert client.chat_many(served_base, PROMPTS, max_tokens=DECODING.max_new_tokens) == base
    assert set(client.adapters()) == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]
    client.close()
