"""On-policy distillation from a teacher behind an endpoint: TRL's `DistillationTrainer` with the
teacher's forward pass replaced by the log-probabilities it serves (`pipeline.train.teacher`).

Everything but the loss is TRL's: the student samples tonight's prompts with its own `generate`,
batches, schedules and logs. An endpoint does not return the teacher's whole distribution, only the
log-probabilities of the tokens it is shown and of its `k` likeliest at each position (vLLM's
`prompt_logprobs: k`, `train.teacher.top_logprobs`). So the loss is the reverse KL of on-policy
distillation (Agarwal et al. 2024; Thinking Machines' "On-Policy Distillation", 2025) on that support:

  - `top_logprobs > 0`: at every reply token, both distributions restricted to the teacher's top-k
    and the sampled token, plus one bucket for the rest of the vocabulary (each side's remaining
    mass), and the exact reverse KL `sum p_s (log p_s - log p_t)` over those buckets: a gradient on
    every listed token, as TRL's sparse server loss does with its tail bucket;
  - `top_logprobs = 0`: the sampled token alone, the policy-gradient estimate whose per-token
    advantage is `log p_t(x_t) - log p_s(x_t)` (the gradient of the reverse KL in expectation over
    the student's samples), one number a token and noisier.

Written here because TRL's sparse server loss (`experimental.server_distillation`) is tied to its own
server client. Both log-probabilities are of the raw distributions (vLLM's prompt log-probabilities
are taken before any sampling temperature), so `train.temperature` changes which tokens the student
visits, not the target. The mean per-token divergence is logged per step as `teacher_reverse_kl`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl.trainer.distillation_trainer import DistillationTrainer

from pipeline.train.teacher import EndpointTeacher

__all__ = ["EndpointDistillationTrainer"]

UNLISTED = -1e4  # the log-probability an unlisted slot stands at (its mass: nothing)


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
        mask = completion_mask.to(student.dtype)
        top = self.teacher.settings.top_logprobs
        if top > 0:
            support, teacher_support, listed = self._teacher_support(
                prompt_ids, prompt_mask, completion_ids, completion_mask, top
            )
            per_token = _bucketed_reverse_kl(log_probs.gather(-1, support), teacher_support, listed)
            divergence = per_token * mask
            loss_sum = divergence.sum()
        else:
            teacher = self._teacher_logprobs(prompt_ids, prompt_mask, completion_ids, completion_mask)
            divergence = (student.detach() - teacher) * mask  # the per-token reverse-KL estimate
            loss_sum = (divergence * student * mask).sum()  # its gradient is the reverse KL's
        n_valid = mask.sum()
        if num_items_in_batch is None:
            loss = loss_sum / n_valid.clamp(min=1)
        else:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device)
        entropy_sum = (-(log_probs.exp() * log_probs).sum(-1) * mask).sum()
        mode = "train" if self.model is not None and self.model.training else "eval"
        self._metrics[mode]["teacher_reverse_kl"].append(
            (divergence.detach().sum() / n_valid.clamp(min=1)).item()
        )
        return loss, entropy_sum.detach(), n_valid.long()

    def _teacher_support(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
        completion_mask: torch.Tensor, top: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Per reply token, the ids the teacher listed (its top `top` and the sampled one), their teacher
        log-probabilities and which slots are real: each (B, T, top + 1), padded with id 0 / False."""
        sequences, starts, lengths = _sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        rows = self.teacher.token_distributions(sequences, starts, top=top)
        shape = (*completion_ids.shape, top + 1)
        support = torch.zeros(shape, dtype=torch.long, device=completion_ids.device)
        teacher = torch.zeros(shape, dtype=torch.float32, device=completion_ids.device)
        listed = torch.zeros(shape, dtype=torch.bool, device=completion_ids.device)
        for row, (distributions, length) in enumerate(zip(rows, lengths, strict=True)):
            for position, distribution in enumerate(distributions[:length]):
                ranked = sorted(distribution.items(), key=lambda item: -item[1])[: top + 1]
                for slot, (token, value) in enumerate(ranked):
                    support[row, position, slot] = token
                    teacher[row, position, slot] = value
                    listed[row, position, slot] = True
        return support, teacher, listed

    def _teacher_logprobs(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The teacher's log-probability of every reply token, laid out as `completion_ids` (0 on padding)."""
        sequences, starts, lengths = _sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        scored = self.teacher.token_logprobs(sequences, starts)
        teacher = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        for row, (values, length) in enumerate(zip(scored, lengths, strict=True)):
            if length:
                teacher[row, :length] = torch.tensor(values[:length], dtype=torch.float32)
        return teacher


def _sequences(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[list[list[int]], list[int], list[int]]:
    """Each row's prompt (left padding dropped) and reply (right padding dropped) as one token list, where
    its reply starts, and the reply's length."""
    sequences: list[list[int]] = []
    starts: list[int] = []
    lengths: list[int] = []
    for prompt, p_mask, reply, r_mask in zip(
        prompt_ids.tolist(),
        prompt_mask.tolist(),
        completion_ids.tolist(),
        completion_mask.tolist(),
        strict=True,
    ):
        kept_prompt = [token for token, keep in zip(prompt, p_mask, strict=True) if keep]
        length = int(sum(r_mask))  # the mask is 1 up to the reply's end, 0 after
        sequences.append(kept_prompt + reply[:length])
        starts.append(len(kept_prompt))
        lengths.append(length)
    return sequences, starts, lengths


def _with_rest(log_probs: torch.Tensor, listed: torch.Tensor) -> torch.Tensor:
    """`log_probs` on the listed slots (-inf elsewhere) and one more bucket: the log of the mass left."""
    # A large finite stand-in rather than -inf: a padded position lists nothing, and -inf everywhere
    # would make logsumexp's gradient NaN there (multiplied by the mask's zero, still NaN).
    kept = log_probs.masked_fill(~listed, UNLISTED)
    mass = torch.logsumexp(kept, dim=-1, keepdim=True).clamp(max=-1e-6)  # the rest is never quite empty
    return torch.cat([kept, torch.log(-torch.expm1(mass))], dim=-1)


def _bucketed_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, listed: torch.Tensor) -> torch.Tensor:
    """Per token, KL(student || teacher) over the listed ids and one bucket for the rest: (B, T)."""
    real = torch.cat([listed, torch.ones_like(listed[..., :1])], dim=-1)
    s, t = _with_rest(student, listed), _with_rest(teacher, listed)
    gap = torch.where(real, s - t, torch.zeros_like(s))
    return (s.exp() * gap).sum(-1)
