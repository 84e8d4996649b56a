"""On-policy distillation from a teacher behind an endpoint: TRL's `DistillationTrainer` with the
teacher's forward pass replaced by its per-token log-probabilities (`pipeline.train.teacher`).

Everything but the loss is TRL's: the student samples tonight's prompts with its own `generate`,
batches, schedules and logs. An endpoint returns the log-probability of the tokens it is given, not
the teacher's whole distribution, so the loss is the sampled-token estimate of the reverse KL that
on-policy distillation is defined by (Agarwal et al. 2024; Thinking Machines' "On-Policy
Distillation", 2025): with `x` the student's own sample, the gradient of `KL(student || teacher)`
is `E[(log p_s(x) - log p_t(x)) * grad log p_s(x)]`, i.e. a policy gradient whose per-token
advantage is `log p_t(x_t) - log p_s(x_t)`: tokens the teacher finds likelier than the student are
pushed up, the others down. Written here because TRL's sparse server loss (`experimental.
server_distillation`) is tied to its own server client; this is the loss in a dozen lines.

Both log-probabilities are of the raw distributions (vLLM's prompt log-probabilities are taken
before any sampling temperature), so `train.temperature` changes which tokens the student visits,
not the target. The mean estimate is logged per step as `teacher_reverse_kl`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl.trainer.distillation_trainer import DistillationTrainer

from pipeline.train.teacher import EndpointTeacher

__all__ = ["EndpointDistillationTrainer"]


class EndpointDistillationTrainer(DistillationTrainer):
    """`DistillationTrainer` whose teacher is an `EndpointTeacher` instead of a local model."""

    def __init__(self, *args: Any, teacher: EndpointTeacher, **kwargs: Any) -> None:
        super().__init__(*args, teacher_model=None, **kwargs)
        self.teacher = teacher

    def _compute_loss(
        self, unwrapped_student: Any, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        width = completion_ids.size(1)
        outputs = unwrapped_student(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            logits_to_keep=width + 1,
            use_cache=False,
        )
        log_probs = F.log_softmax(outputs.logits[:, :-1, :].float(), dim=-1)  # predicts each reply token
        student = log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        teacher = self._teacher_logprobs(prompt_ids, prompt_mask, completion_ids, completion_mask)
        mask = completion_mask.to(student.dtype)
        gap = (student.detach() - teacher) * mask  # the per-token reverse-KL estimate
        loss_sum = (gap * student * mask).sum()  # its gradient is the reverse KL's
        n_valid = mask.sum()
        if num_items_in_batch is None:
            loss = loss_sum / n_valid.clamp(min=1)
        else:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device)
        entropy_sum = (-(log_probs.exp() * log_probs).sum(-1) * mask).sum()
        mode = "train" if self.model is not None and self.model.training else "eval"
        self._metrics[mode]["teacher_reverse_kl"].append((gap.sum() / n_valid.clamp(min=1)).item())
        return loss, entropy_sum.detach(), n_valid.long()

    def _teacher_logprobs(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The teacher's log-probability of every reply token, laid out as `completion_ids` (0 on padding)."""
        sequences: list[list[int]] = []
        starts: list[int] = []
        lengths: list[int] = []
        for prompt, p_mask, reply, r_mask in zip(
            prompt_ids.tolist(), prompt_mask.tolist(), completion_ids.tolist(), completion_mask.tolist(),
            strict=True,
        ):  # fmt: skip
            kept_prompt = [token for token, keep in zip(prompt, p_mask, strict=True) if keep]
            length = int(sum(r_mask))  # the mask is 1 up to the reply's end, 0 after
            sequences.append(kept_prompt + reply[:length])
            starts.append(len(kept_prompt))
            lengths.append(length)
        scored = self.teacher.token_logprobs(sequences, starts)
        teacher = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        for row, (values, length) in enumerate(zip(scored, lengths, strict=True)):
            if length:
                teacher[row, :length] = torch.tensor(values[:length], dtype=torch.float32)
        return teacher
