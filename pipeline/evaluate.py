"""The evaluation half of the forgetting guard: score champion and candidate, measure drift, ask the gate.

`evals.gate.decide` is pure: it judges scores it is given. This module produces those scores
in-process with transformers + PEFT (CPU is enough for the tiny model and for CI): greedy, hence
deterministic, generation of the champion's (or the base's) and the candidate's replies to every
suite's programmatic cases, the suites' graders on those replies, and the candidate's exact
per-token KL to the base on a probe of the suites' prompts. Greedy decoding makes a rerun give the
same decision, so a gate failure is a property of the adapter, not of a sampling seed. Judge cases
need the LLM judge and are left to the judge stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from evals.gate import GateReport, GateThresholds, SuiteScores, decide
from evals.suites import Suite, SuiteCase
from pipeline.train import load_base
from pipeline.train_bounds import completion_mask, masked_token_kl

__all__ = [
    "KL_PROBE_PROMPTS",
    "evaluate_candidate",
    "generate",
    "probe_kl",
    "programmatic_cases",
    "score_suite",
]

KL_PROBE_PROMPTS = 16  # suite prompts the candidate's KL to the base is measured on
END_TOKEN = "<|end|>"  # the chat template's end-of-turn marker, a stop token when the tokenizer has it

Chat = list[dict[str, str]]


def _tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(base_model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _stop_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The generation config's eos ids, the tokenizer's eos and `<|end|>` when it is in the vocabulary."""
    configured = model.generation_config.eos_token_id
    ids: list[int] = [configured] if isinstance(configured, int) else list(configured or [])
    end = tokenizer.convert_tokens_to_ids(END_TOKEN) if END_TOKEN in tokenizer.get_vocab() else None
    for token_id in (tokenizer.eos_token_id, end):
        if isinstance(token_id, int) and token_id not in ids:
            ids.append(token_id)
    return ids


@contextmanager
def _model(base_model: str, adapter_dir: Path | None, reference: Path | None = None) -> Iterator[Any]:
    """The base in eval mode, with `adapter_dir` as "default" (and `reference` as "reference") when given."""
    model: Any = load_base(base_model)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if reference is not None:
            model.load_adapter(str(reference), adapter_name="reference")
    model.eval()
    with torch.no_grad():
        yield model


def _encode(tokenizer: PreTrainedTokenizerBase, chats: Sequence[Chat], device: torch.device) -> Any:
    encoded: Any = tokenizer.apply_chat_template(
        [list(chat) for chat in chats], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return tokenizer.pad({"input_ids": encoded["input_ids"]}, padding_side="left", return_tensors="pt").to(
        device
    )


def _greedy(model: Any, tokenizer: PreTrainedTokenizerBase, inputs: Any, stop_ids: list[int], n: int) -> Any:
    return model.generate(
        **inputs,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=n,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


def generate(
    base_model: str,
    adapter_dir: Path | None,
    prompts: Sequence[Chat],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> list[str]:
    """Greedy replies to chat `prompts` (one per prompt, in order), with the adapter when given."""
    tokenizer = _tokenizer(base_model)
    replies: list[str] = []
    with _model(base_model, adapter_dir) as model:
        device = next(model.parameters()).device
        stop_ids = _stop_ids(model, tokenizer)
        for start in range(0, len(prompts), batch_size):
            inputs = _encode(tokenizer, prompts[start : start + batch_size], device)
            output = _greedy(model, tokenizer, inputs, stop_ids, max_new_tokens)
            completions = output[:, inputs["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(completions, skip_special_tokens=True)
    return replies


def probe_kl(
    base_model: str,
    adapter_dir: Path,
    reference_adapter: Path | None,
    prompts: Sequence[Chat],
    *,
    max_new_tokens: int = 16,
) -> float:
    """Mean per-token KL(candidate || reference) over the candidate's greedy continuations of `prompts`.

    Exact over the full vocabulary at every generated position (up to and including the first stop
    token), from the log-softmax of both models' logits; `reference_adapter` None is the base.
    """
    if not prompts:
        return 0.0
    tokenizer = _tokenizer(base_model)
    with _model(base_model, adapter_dir, reference_adapter) as model:
        device = next(model.parameters()).device
        inputs = _encode(tokenizer, prompts, device)
        stop_ids = _stop_ids(model, tokenizer)
        sequences = _greedy(model, tokenizer, inputs, stop_ids, max_new_tokens)
        prompt_length = inputs["input_ids"].shape[1]
        mask = completion_mask(sequences[:, prompt_length:], stop_ids)
        attention = torch.cat([inputs["attention_mask"], mask.long()], dim=1)
        scored = slice(prompt_length - 1, -1)  # logits at position t predict token t + 1
        candidate = model(input_ids=sequences, attention_mask=attention).logits[:, scored]
        if reference_adapter is None:
            with model.disable_adapter():
                reference = model(input_ids=sequences, attention_mask=attention).logits[:, scored]
        else:
            model.set_adapter("reference")
            reference = model(input_ids=sequences, attention_mask=attention).logits[:, scored]
            model.set_adapter("default")
    total, count = masked_token_kl(candidate, reference, mask)
    return total / count if count else 0.0


def programmatic_cases(suite: Suite) -> list[SuiteCase]:
    """The suite's cases a programmatic grader scores (judge cases left out: the judge stage scores them)."""
    return [case for case in suite.cases if not case.is_judge]


def score_suite(suite: Suite, responses: Sequence[str]) -> list[float]:
    """Scores of `responses`, one per programmatic case of `suite` in order; judge cases are left out."""
    cases = programmatic_cases(suite)
    if len(responses) != len(cases):
        raise ValueError(
            f"suite {suite.name!r}: {len(responses)} responses for {len(cases)} programmatic cases"
        )
    return [case.score(response) for case, response in zip(cases, responses, strict=True)]


def evaluate_candidate(
    base_model: str,
    candidate: Path,
    champion: Path | None,
    suites: Sequence[Suite],
    *,
    thresholds: GateThresholds,
    heldout_candidate: Sequence[float] = (),
    heldout_champion: Sequence[float] = (),
) -> GateReport:
    """The gate's report on `candidate` against `champion` (the base when None) on the suites' programmatic cases.

    The KL gate gets the candidate's KL to the base on the first `KL_PROBE_PROMPTS` suite prompts;
    the held-out rewards (paired per prompt) come from the judge stage.
    """
    prompts = [[dict(m) for m in case.messages] for suite in suites for case in programmatic_cases(suite)]
    candidate_replies = generate(base_model, candidate, prompts)
    champion_replies = generate(base_model, champion, prompts)
    scores: list[SuiteScores] = []
    start = 0
    for suite in suites:
        end = start + len(programmatic_cases(suite))
        scores.append(
            SuiteScores(
                suite=suite.name,
                candidate=score_suite(suite, candidate_replies[start:end]),
                champion=score_suite(suite, champion_replies[start:end]),
                safety=suite.is_safety,
            )
        )
        start = end
    kl = probe_kl(base_model, candidate, None, prompts[:KL_PROBE_PROMPTS])
    return decide(
        scores,
        heldout_candidate=list(heldout_candidate),
        heldout_champion=list(heldout_champion),
        kl_to_base=kl,
        thresholds=thresholds,
    )
