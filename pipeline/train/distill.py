"""On-policy distillation from a teacher: the student (the track's adapter, from the champion)
samples replies to tonight's prompts, the teacher scores every sampled token, and the loss is the
per-token reverse KL of the student to the teacher on the student's own replies (`train.method:
distill`). The signal is dense: every token of every reply says how the teacher would have
continued, where GRPO learns from one number per reply.

The learning is TRL's `DistillationTrainer` (stable since TRL 1.x): it samples with the student's
`generate` and, for a local teacher (`train.teacher.path`, loaded in-process beside the student in
evaluation mode and without gradients), takes the divergence over the whole vocabulary from the
teacher's logits, chunk by chunk (`train.distill_beta`: 1 reverse KL, 0 forward KL, between them the
generalised JSD). A teacher behind an OpenAI-compatible endpoint (`train.teacher.base_url` and
`model`: the bigger model a platform serves elsewhere) gives only the log-probabilities of the
tokens it is shown, so that path trains on the sampled-token estimate of the reverse KL
(`pipeline.train.endpoint_distiller`, the teacher client in `pipeline.train.teacher`).

Written here is only what a nightly loop needs around it, as for every method: the champion as a
frozen "ref" adapter for the per-step KL probe (the bounds' `kl_budget` means the same as for
every other method; the trainer's own loss is the KL to the teacher, not to the champion), the
same bounds, outputs and forgetting guard, and a teacher check before anything runs: teacher and
student must share a tokenizer (the same vocabulary, token for token, and the same vocabulary size
in their configs; an endpoint is probed instead, see `EndpointTeacher.probe`), since the loss
compares their distributions id by id; a mismatch, or an endpoint that gives no log-probabilities,
is a one-line config error (`TeacherMismatch`), not a silently meaningless loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import OvernightConfig, TeacherConfig, TrainConfig
from pipeline.results import TrainPrompt
from pipeline.train.bounds import planned_steps
from pipeline.train.feedback import ProbedRecipe, add_frozen_reference
from pipeline.train.recipe import Progress, RewardFunction, _dtype, lora_config
from pipeline.train.teacher import EndpointTeacher, TeacherMismatch, TeacherUnavailable

__all__ = ["DistillRecipe", "TeacherMismatch", "TeacherUnavailable", "check_teacher", "check_teachers"]

logger = logging.getLogger(__name__)


def check_teacher(teacher: TeacherConfig, base_model: str) -> None:
    """Raise `TeacherMismatch` (one line) unless the teacher can teach `base_model`: a local teacher
    loads and shares the student's tokenizer; an endpoint serves the model, gives log-probabilities
    and decodes tokens as the student's tokenizer does (`TeacherUnavailable` when it cannot be reached)."""
    from transformers import AutoConfig, AutoTokenizer

    if teacher.path is None:
        client = EndpointTeacher(teacher)
        try:
            client.probe(AutoTokenizer.from_pretrained(base_model))
        finally:
            client.close()
        return
    where = teacher.where
    local = Path(teacher.path)
    if (local.is_absolute() or teacher.path.startswith(".")) and not local.is_dir():
        raise TeacherMismatch(
            f"{where}: not a model directory the student can learn from (no such directory)"
        )
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher.path)
        teacher_config = AutoConfig.from_pretrained(teacher.path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeacherMismatch(
            f"{where}: not a model directory the student can learn from ({first})"
        ) from None
    student_tokenizer = AutoTokenizer.from_pretrained(base_model)
    student_config = AutoConfig.from_pretrained(base_model)
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])
        example = f"e.g. token {differing[0][0]!r}" if differing else "the same tokens in another order"
        raise TeacherMismatch(
            f"{where}: its tokenizer is not the base model's ({len(teacher_vocab)} tokens against "
            f"{len(student_vocab)}, {len(differing)} {'entry differs' if len(differing) == 1 else 'entries differ'}, "
            f"{example}); distillation compares "
            "the two models token id by token id, so they must share one tokenizer"
        )
    teacher_size = teacher_config.get_text_config().vocab_size
    student_size = student_config.get_text_config().vocab_size
    if teacher_size != student_size:
        raise TeacherMismatch(
            f"{where}: its vocabulary has {teacher_size} rows against the base model's {student_size}; "
            "teacher and student must have the same output size"
        )


class DistillRecipe(ProbedRecipe):
    """A night of on-policy distillation: tonight's prompts, the student's samples, the teacher's logits."""

    method = "distill"

    def setup(
        self,
        prompts: Sequence[TrainPrompt],
        reward_funcs: Sequence[RewardFunction],
        reward_weights: Sequence[float] | None,
        progress: Progress | None,
    ) -> None:
        settings = self.settings
        teacher = teacher_of(settings)
        check_teacher(teacher, self.base_model)
        self.prompts = list(prompts)[: settings.max_prompts]
        self.start()
        rows = [{"prompt": prompt.messages} for prompt in self.prompts]
        self.data = {"prompts": len(rows)}
        self.max_steps = planned_steps(
            len(rows), settings.prompts_per_step, settings.max_steps, settings.epochs
        )
        if self.max_steps == 0:
            self.detail = (
                f"distill has {len(rows)} prompts, fewer than one step of "
                f"train.prompts_per_step={settings.prompts_per_step}"
            )
            logger.warning("distill: nothing to train on tonight: %s", self.detail)
            return
        tokenizer = self.tokenizer()
        self.log_estimate(tokenizer, sequences_per_prompt=1)
        from datasets import Dataset
        from transformers import AutoModelForCausalLM

        model = self.load_policy()
        if self.champion is None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(settings.lora))
        else:
            add_frozen_reference(model, self.champion)
        callbacks = [self.night_bounds_callback(progress, kl_probe=self._kl_probe)]
        dataset = Dataset.from_list(rows * settings.epochs)
        if teacher.path is not None:
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher.path, dtype=_dtype())
            teacher_model.eval()
            trainer = self.build_distiller(model, teacher_model, dataset, tokenizer, callbacks)
        else:
            trainer = self.build_endpoint_distiller(
                model, EndpointTeacher(teacher), dataset, tokenizer, callbacks
            )
        self.attach(trainer)

    def distill_args(self) -> Any:
        from trl.trainer.distillation_config import DistillationConfig

        settings = self.settings
        return self.trainer_args(
            DistillationConfig,
            beta=settings.distill_beta,
            temperature=settings.temperature,
            max_completion_length=settings.max_completion_tokens,
            top_k=0,
            top_p=1.0,
        )

    def build_distiller(
        self, model: Any, teacher: Any, dataset: Any, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        from trl.trainer.distillation_trainer import DistillationTrainer

        return DistillationTrainer(
            model=model,
            teacher_model=teacher,
            args=self.distill_args(),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    def build_endpoint_distiller(
        self, model: Any, teacher: EndpointTeacher, dataset: Any, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        from pipeline.train.endpoint_distiller import EndpointDistillationTrainer

        if self.settings.distill_beta != 1.0:
            logger.warning(
                "distill: %s gives sampled-token log-probabilities only; training on the reverse KL "
                "(train.distill_beta=%s applies to a local teacher)",
                teacher.where,
                self.settings.distill_beta,
            )
        return EndpointDistillationTrainer(
            model=model,
            teacher=teacher,
            args=self.distill_args(),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )


def teacher_of(settings: TrainConfig) -> TeacherConfig:
    if settings.teacher is None:  # the config refuses this already; a job file built by hand may not
        raise TeacherMismatch(
            "train.method distill needs train.teacher (a path, or a base_url and model: the model to learn from)"
        )
    return settings.teacher


def check_teachers(config: OvernightConfig, tracks: Sequence[str]) -> None:
    """`check_teacher` for every distilling track among `tracks`: before a night runs, not at its train stage.

    A teacher that cannot teach is a config error for the whole run; an endpoint that cannot be reached
    now is only a warning (it may be back by the train stage, which retries it and fails that track's
    night with one line if not), so one teacher's outage does not stop the other tracks.
    """
    for name in tracks:
        settings = config.train_for(name)
        if settings.method == "distill":
            try:
                check_teacher(teacher_of(settings), config.base_model_for(name))
            except TeacherUnavailable as error:
                logger.warning("%s: %s; its train stage will try again", name, error)
