"""Failures of a distillation teacher behind an endpoint that need no competent model: a LoRA adapter
named as the teacher is refused before it is asked anything (vLLM's engine fails on prompt
log-probabilities of LoRA requests), and a teacher that goes away fails the night's training in one
line without writing an adapter. Learning from a served teacher is in `test_distill.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import TeacherConfig, TrainConfig
from pipeline.deploy.vllm_client import VllmClient
from pipeline.deploy.vllm_process import free_port
from pipeline.results import TrainPrompt
from pipeline.train.distill import check_teacher
from pipeline.train.recipe import load_base, lora_config, save_adapter
from pipeline.train.stage import train
from pipeline.train.teacher import TeacherMismatch, TeacherUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = [TrainPrompt(messages=[{"role": "user", "content": f"Where is my order {n}?"}]) for n in range(8)]


def test_a_lora_adapter_as_the_teacher_is_refused_before_it_can_break_the_server(
    vllm_server: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import get_peft_model

    adapter = tmp_path / "adapter"
    save_adapter(get_peft_model(load_base(str(tiny_model_dir)), lora_config(TrainConfig().lora)), adapter,
                 str(tiny_model_dir))  # fmt: skip
    client = VllmClient(vllm_server.base_url)
    client.load_adapter("teacher-lora", str(adapter))
    try:
        with pytest.raises(TeacherMismatch, match="is a LoRA adapter the server serves on 'tiny'"):
            check_teacher(
                TeacherConfig(base_url=vllm_server.base_url, model="teacher-lora"), str(tiny_model_dir)
            )
    finally:
        client.unload_adapter("teacher-lora")
    assert client.chat_many("tiny", [[{"role": "user", "content": "Hi"}]], max_tokens=4)  # still serving


def test_a_teacher_that_goes_away_fails_the_night_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    gone = TeacherConfig(base_url=f"http://127.0.0.1:{free_port()}", model="teacher", max_retries=1)
    settings = TrainConfig(method="distill", max_steps=2, teacher=gone)
    with pytest.raises(TeacherUnavailable) as caught:
        train(settings, PROMPTS, [], base_model=str(tiny_model_dir), out_dir=tmp_path / "night")
    message = str(caught.value)
    assert message.startswith(f"teacher teacher at {gone.base_url}/v1 failed after 2 attempts: ConnectError")
    assert "\n" not in message
    assert not (tmp_path / "night" / "adapter").exists()
