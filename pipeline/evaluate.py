"""The evaluation half of the forgetting guard: generate replies, score them, measure drift, ask the gate.

`evals.gate.decide` is pure: it judges scores it is given. This module produces those scores. The
base, the champion and the candidate answer every suite case and every held-out prompt, through a
`ReplyGenerator`: the serving engine (`ServerGenerator`: the candidate is loaded into the vLLM
server under a temporary adapter name and unloaded after, so the champion's serving names are never
touched) when a server is configured, transformers in-process (`InProcessGenerator`) otherwise.
Decoding is greedy by default, so a rerun gives the same decision and a gate failure is a property
of the adapter, not of a sampling seed. Programmatic cases are scored by their graders; judge cases
and held-out prompts by a `Scorer` the caller builds from the track's reward (`pipeline.gating`).
The candidate's exact per-token KL to the base comes from full-vocabulary log-probabilities
in-process (a server returns only the top few log-probabilities).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from evals.gate import GateReport, GateThresholds, SuiteScores, decide
from evals.suites import Suite, SuiteCase
from pipeline.adapters import check_adapter_dir
from pipeline.train import TrainPrompt, load_base
from pipeline.train_bounds import completion_mask, masked_token_kl
from pipeline.vllm_client import VllmClient

__all__ = [
    "KL_PROBE_PROMPTS",
    "Decoding",
    "InProcessGenerator",
    "ReplyGenerator",
    "Scorer",
    "ServerGenerator",
    "evaluate_candidate",
    "generate",
    "probe_kl",
    "programmatic_cases",
    "score_suite",
]

logger = logging.getLogger(__name__)

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


def _greedy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    inputs: Any,
    stop_ids: list[int],
    n: int,
    temperature: float = 0.0,
) -> Any:
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    return model.generate(
        **inputs,
        **sampling,
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
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Replies to chat `prompts` (one per prompt, in order), with the adapter when given.

    Greedy at temperature 0; sampled (seeded with `seed`) above it.
    """
    tokenizer = _tokenizer(base_model)
    replies: list[str] = []
    with _model(base_model, adapter_dir) as model:
        device = next(model.parameters()).device
        stop_ids = _stop_ids(model, tokenizer)
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            inputs = _encode(tokenizer, prompts[start : start + batch_size], device)
            output = _greedy(model, tokenizer, inputs, stop_ids, max_new_tokens, temperature)
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


# --------------------------------------------------------------------------- generators


@dataclass(frozen=True)
class Decoding:
    """How replies are decoded for the gate: greedy (temperature 0, the default) or sampled."""

    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy, deterministic; > 0: sampled with `seed`
    seed: int = 0


class ReplyGenerator(Protocol):
    """Replies of the base (`adapter` None) or of an adapter directory to chat prompts, in order."""

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]: ...


@dataclass(frozen=True)
class InProcessGenerator:
    """transformers + PEFT in this process, batched (CPU is enough for the tiny model)."""

    base_model: str
    batch_size: int = 8

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        return generate(
            self.base_model,
            adapter,
            prompts,
            max_new_tokens=decoding.max_new_tokens,
            batch_size=self.batch_size,
            temperature=decoding.temperature,
            seed=decoding.seed,
        )


@dataclass(frozen=True)
class ServerGenerator:
    """A running vLLM server: an adapter is loaded under a temporary name, asked, then unloaded.

    The temporary name (`<prefix>-<random>`) never collides with a serving name, so the stable
    `<track>` and pinned `<track>@v<N>` names keep serving what they served. Requests go out
    `concurrency` at a time and the server batches them. The adapter directory must be readable by
    the server at the same path (same machine, or a shared volume).
    """

    client: VllmClient
    base_name: str  # the name the server serves the base model under
    name_prefix: str = "gate"
    concurrency: int = 16

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        if adapter is None:
            return self._ask(self.base_name, prompts, decoding)
        check_adapter_dir(adapter)
        name = f"{self.name_prefix}-{uuid.uuid4().hex[:10]}"
        self.client.load_adapter(name, str(Path(adapter).resolve()))
        try:
            return self._ask(name, prompts, decoding)
        finally:
            try:
                self.client.unload_adapter(name)
            except Exception as error:  # the replies are good; a leftover temporary name is only logged
                logger.warning("could not unload temporary adapter %s: %s", name, error)

    def _ask(self, model: str, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        return self.client.chat_many(
            model,
            prompts,
            max_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            seed=decoding.seed if decoding.temperature > 0 else None,
            concurrency=self.concurrency,
        )


# --------------------------------------------------------------------------- scoring

# Scores of replies: (conversations, replies, references, rubrics) -> one score or None per reply;
# a rubric of None means the track's own. Built from the track's reward by `pipeline.gating`.
Scorer = Callable[
    [Sequence[Chat], Sequence[str], Sequence[str | None], Sequence[str | None]], list[float | None]
]


def programmatic_cases(suite: Suite) -> list[SuiteCase]:
    """The suite's cases a programmatic grader scores."""
    return [case for case in suite.cases if not case.is_judge]


def score_suite(suite: Suite, responses: Sequence[str]) -> list[float]:
    """Scores of `responses`, one per programmatic case of `suite` in order; judge cases are left out."""
    cases = programmatic_cases(suite)
    if len(responses) != len(cases):
        raise ValueError(
            f"suite {suite.name!r}: {len(responses)} responses for {len(cases)} programmatic cases"
        )
    return [case.score(response) for case, response in zip(cases, responses, strict=True)]


def _case_scores(
    cases: Sequence[SuiteCase], replies: Sequence[str], scorer: Scorer | None
) -> list[float | None]:
    scores: list[float | None] = [
        None if case.is_judge else case.score(reply) for case, reply in zip(cases, replies, strict=True)
    ]
    judged = [index for index, case in enumerate(cases) if case.is_judge]
    if judged and scorer is not None:
        verdicts = scorer(
            [[dict(m) for m in cases[i].messages] for i in judged],
            [replies[i] for i in judged],
            [cases[i].reference for i in judged],
            [cases[i].rubric for i in judged],
        )
        for index, verdict in zip(judged, verdicts, strict=True):
            scores[index] = verdict
    return scores


def _paired(*columns: Sequence[float | None]) -> list[list[float]]:
    """Keep the positions where every column has a score (a failed judgment drops the pair)."""
    kept = [i for i in range(len(columns[0])) if all(column[i] is not None for column in columns)]
    return [[float(column[i]) for i in kept] for column in columns]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Evaluation:
    """Everything the gate decided on, for the report and MLflow."""

    report: GateReport
    suites: list[SuiteScores]
    heldout_candidate: list[float]
    heldout_champion: list[float]
    kl_to_base: float
    generated: int  # replies generated (all three models)
    backend: str  # "vllm" or "in-process"


def evaluate_candidate(
    base_model: str,
    candidate: Path,
    champion: Path | None,
    suites: Sequence[Suite],
    *,
    thresholds: GateThresholds,
    generator: ReplyGenerator | None = None,
    scorer: Scorer | None = None,
    heldout: Sequence[TrainPrompt] = (),
    heldout_candidate: Sequence[float] = (),
    heldout_champion: Sequence[float] = (),
    decoding: Decoding = Decoding(),
    score_base: bool = True,
) -> Evaluation:
    """The gate's evaluation of `candidate` against `champion` (the base when None).

    Every suite case and every `heldout` prompt is answered by the candidate, the champion and (for
    context, when `score_base`) the base through `generator` (in-process by default). Programmatic
    cases are scored by their graders; judge cases and held-out replies by `scorer` (without one,
    judge cases are not scored and held-out scores must be given as `heldout_candidate` /
    `heldout_champion`). The KL gate gets the candidate's KL to the base on the first
    `KL_PROBE_PROMPTS` suite prompts.
    """
    generator = generator or InProcessGenerator(base_model)
    per_suite = [
        [case for case in suite.cases if scorer is not None or not case.is_judge] for suite in suites
    ]
    cases = [case for suite_cases in per_suite for case in suite_cases]
    prompts = [[dict(m) for m in case.messages] for case in cases] + [list(p.messages) for p in heldout]
    models: dict[str, Path | None] = {"candidate": candidate, "champion": champion}
    if score_base:
        models["base"] = None
    replies = {name: generator.replies(adapter, prompts, decoding) for name, adapter in models.items()}
    n_cases = len(cases)
    case_scores = {name: _case_scores(cases, reply[:n_cases], scorer) for name, reply in replies.items()}
    scores = _suite_scores(suites, [len(suite_cases) for suite_cases in per_suite], case_scores)
    if heldout and scorer is not None:
        conversations = [list(p.messages) for p in heldout]
        references = [p.reference for p in heldout]
        rubrics = [None] * len(heldout)
        judged = {
            name: scorer(conversations, reply[n_cases:], references, rubrics)
            for name, reply in replies.items()
            if name != "base"
        }
        heldout_candidate, heldout_champion = _paired(judged["candidate"], judged["champion"])
    # Suite prompts first; the held-out prompts when the suites have none.
    kl_prompts = prompts[: min(n_cases, KL_PROBE_PROMPTS)] or prompts[n_cases : n_cases + KL_PROBE_PROMPTS]
    kl = probe_kl(base_model, candidate, None, kl_prompts)
    report = decide(
        scores,
        heldout_candidate=list(heldout_candidate),
        heldout_champion=list(heldout_champion),
        kl_to_base=kl,
        thresholds=thresholds,
    )
    return Evaluation(
        report=report,
        suites=scores,
        heldout_candidate=list(heldout_candidate),
        heldout_champion=list(heldout_champion),
        kl_to_base=kl,
        generated=sum(len(reply) for reply in replies.values()),
        backend="vllm" if isinstance(generator, ServerGenerator) else "in-process",
    )


def _suite_scores(
    suites: Sequence[Suite], sizes: Sequence[int], case_scores: dict[str, list[float | None]]
) -> list[SuiteScores]:
    """Per-suite paired scores from the flat per-case scores (suites' cases are consecutive)."""
    scores: list[SuiteScores] = []
    start = 0
    for suite, size in zip(suites, sizes, strict=True):
        end = start + size
        columns = [case_scores["candidate"][start:end], case_scores["champion"][start:end]]
        if "base" in case_scores:
            columns.append(case_scores["base"][start:end])
        paired = _paired(*columns)
        scores.append(
            SuiteScores(
                suite=suite.name,
                candidate=paired[0],
                champion=paired[1],
                base=paired[2] if len(paired) > 2 else None,
                safety=suite.is_safety,
            )
        )
        start = end
    return scores
