"""A distillation teacher behind an OpenAI-compatible endpoint: the log-probability it gives every
token of the student's replies.

The request is a plain `/v1/completions` call with the reply's token ids as the prompt (prompt then
reply, exactly as the student sampled them), `max_tokens` 1 and vLLM's `prompt_logprobs: k`
extension (`train.teacher.top_logprobs`): the server answers, at every given token, with the
teacher's log-probability of that token and of its k likeliest there, which is what on-policy
distillation needs (the reverse KL on the tokens the student visits, `endpoint_distiller`). One request carries a whole training step's replies (the completions API takes a list of
token-id prompts).

What comes from the `openai` SDK: the HTTP calls, timeouts, retries with exponential backoff and
jitter on transport errors, timeouts, 408/409/429 and 5xx, and typed errors, as for the judge.

What is written here, because no library does it:
  - reading `prompt_logprobs` back (vLLM returns it next to the standard fields, keyed by token id)
    and refusing an answer that lacks any reply token's log-probability or holds a NaN: the step fails
    with `TeacherUnavailable` (one line) and nothing is ever trained on a missing score;
  - the start check (`probe`): the model is served, is not a LoRA adapter (vLLM 0.32's engine dies on
    prompt log-probabilities of a LoRA request: seen on its CPU build), answers with prompt
    log-probabilities at all (a
    plain OpenAI-compatible server ignores the extension: that teacher cannot teach, and is refused
    with the reason before any night runs), and decodes token ids as the student's tokenizer does.
    The tokenizer cannot be read over the API, so the probe sends a chat-templated question and
    answer plus ids spread over the whole vocabulary and compares the teacher's decoded tokens with
    the student's (an id past the teacher's vocabulary is refused by the server: a mismatch too).

TRL's own server path (`trl.experimental.server_distillation`) speaks the protocol of `trl
vllm-serve`, imports vLLM into the training process and sends no API key; a platform's big model is
usually behind an OpenAI-compatible endpoint with a key, which is what this client talks to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import openai

from pipeline.config import TeacherConfig
from pipeline.judge.client import NO_KEY, api_root, attempts, brief, error_message
from storage.errors import UserError

__all__ = ["EndpointTeacher", "TeacherMismatch", "TeacherUnavailable"]

logger = logging.getLogger(__name__)

PROBE_IDS = 48  # vocabulary ids the tokenizer probe sends, spread evenly from 0 to the last id
PROBE_AGREEMENT = 0.9  # share of probed tokens the teacher must decode as the student does
LOGPROB_FLOOR = -100.0  # a token the teacher gives no probability at all (-inf) counts as this


class TeacherMismatch(UserError):
    """The teacher cannot teach this student: missing, unreadable, another tokenizer, no log-probabilities."""


class TeacherUnavailable(UserError):
    """The teacher's endpoint cannot be reached, refuses the key, keeps failing or answers without scores."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status the endpoint answered with, if it answered


class EndpointTeacher:
    """The teacher at `settings.base_url`, serving `settings.model` (sync: one request per training step)."""

    def __init__(self, settings: TeacherConfig, *, http_client: Any = None) -> None:
        assert settings.base_url is not None and settings.model is not None
        self.settings = settings
        self.model = settings.model
        self.base_url = api_root(settings.base_url)
        self.where = f"teacher {self.model} at {self.base_url}"
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self._headers = {} if key else {"Authorization": openai.omit}
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=key or NO_KEY,
            max_retries=settings.max_retries,
            timeout=settings.timeout_seconds,
            http_client=http_client,
        )

    def close(self) -> None:
        self._client.close()

    def token_logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Per sequence, the teacher's log-probability of every token from `starts[i]` on (the reply).

        Raises `TeacherUnavailable` when the endpoint fails (after its retries) or any asked token comes
        back without a finite log-probability.
        """
        rows = self.token_distributions(sequences, starts, top=0)
        return [
            [
                distribution[int(token)]
                for distribution, token in zip(row, sequence[max(start, 1) :], strict=True)
            ]
            for row, sequence, start in zip(rows, sequences, starts, strict=True)
        ]

    def token_distributions(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, top: int
    ) -> list[list[dict[int, float]]]:
        """Per sequence and reply token, {token id: teacher log-probability} for the token given and the
        teacher's `top` likeliest at that position (vLLM's `prompt_logprobs: top`).

        Raises `TeacherUnavailable` when the endpoint fails (after its retries), any asked token comes
        back without a finite log-probability, or any listed one is NaN.
        """
        if not sequences:
            return []
        choices = self._score([list(map(int, sequence)) for sequence in sequences], top)
        rows: list[list[dict[int, float]]] = []
        for index, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
            entries = choices[index]
            row: list[dict[int, float]] = []
            for position in range(max(start, 1), len(sequence)):
                distribution = _distribution(entries, position)
                if distribution is None or int(sequence[position]) not in distribution:
                    raise TeacherUnavailable(
                        f"{self.where} gave no log-probability for token {position - start} of reply "
                        f"{index}; distillation does not train on missing scores"
                    )
                row.append(distribution)
            rows.append(row)
        return rows

    def probe(self, tokenizer: Any) -> None:
        """Refuse (`TeacherMismatch`) a teacher that is not served, gives no log-probabilities or decodes
        tokens otherwise than `tokenizer`; `TeacherUnavailable` when it cannot be reached."""
        served = self._served_models()
        if served is not None and self.model not in served:
            listed = ", ".join(sorted(served)[:5]) or "nothing"
            raise TeacherMismatch(
                f"{self.where}: the endpoint does not serve {self.model!r} (it serves {listed})"
            )
        parent = (served or {}).get(self.model)
        if parent is not None and parent != self.model:
            raise TeacherMismatch(
                f"{self.where}: {self.model!r} is a LoRA adapter the server serves on {parent!r}, and "
                "vLLM's engine fails on prompt log-probabilities of LoRA requests; serve the teacher as "
                "a model of its own (the adapter merged into its base)"
            )
        chat = [
            {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "12 + 30 = 42. The answer is 42."},
        ]
        ids = list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        vocabulary = len(tokenizer)
        spread = sorted({round(i * (vocabulary - 1) / (PROBE_IDS - 1)) for i in range(PROBE_IDS)})
        sequence = ids + spread
        try:
            entries = self._score([sequence], self.settings.top_logprobs)[0]
        except TeacherUnavailable as error:
            if error.status in (400, 422):  # e.g. an id past the teacher's vocabulary
                raise TeacherMismatch(
                    f"{self.where} refused the probe ({str(error).removeprefix(f'{self.where} answered ')}): "
                    "it does not share the student's tokenizer, or gives fewer prompt log-probabilities "
                    f"than train.teacher.top_logprobs={self.settings.top_logprobs}"
                ) from None
            raise
        compared = agreed = 0
        for position in range(1, len(sequence)):
            token_id = sequence[position]
            entry = _entry(entries, position, token_id)
            if entry is None or not isinstance(entry.get("decoded_token"), str):
                continue
            compared += 1
            mine = tokenizer.decode([token_id], skip_special_tokens=False)
            agreed += _same_text(entry["decoded_token"], mine)
        if compared and agreed < PROBE_AGREEMENT * compared:
            raise TeacherMismatch(
                f"{self.where} decodes {compared - agreed} of {compared} probed token ids otherwise than "
                "the base model's tokenizer; distillation compares the two models token by token, so "
                "they must share one tokenizer"
            )
        logger.info("%s: answers with log-probabilities; %d of %d probed tokens decode alike", self.where,
                    agreed, compared)  # fmt: skip

    # ------------------------------------------------------------------ the requests

    def _served_models(self) -> dict[str, str | None] | None:
        """The model names the endpoint lists, each with its parent when vLLM says it is an adapter on
        one (None when the endpoint does not list models: not every server does)."""
        try:
            page = self._client.models.list(extra_headers=self._headers)
        except openai.NotFoundError:
            return None
        except openai.OpenAIError as error:
            raise self._failure(error) from None
        return {model.id: (model.model_extra or {}).get("parent") for model in page.data}

    def _score(self, sequences: list[list[int]], top: int = 0) -> list[Any]:
        """The `prompt_logprobs` of each sequence, as the server sent them."""
        try:
            completion = self._client.completions.create(
                model=self.model,
                prompt=sequences,
                max_tokens=1,
                temperature=0.0,
                extra_body={"prompt_logprobs": top},
                extra_headers=self._headers,
            )
        except openai.OpenAIError as error:
            raise self._failure(error) from None
        choices = sorted(completion.choices or [], key=lambda choice: choice.index)
        if len(choices) != len(sequences):
            raise TeacherUnavailable(
                f"{self.where} answered {len(choices)} choices for {len(sequences)} sequences"
            )
        scored = [(choice.model_extra or {}).get("prompt_logprobs") for choice in choices]
        if any(not isinstance(entries, list) for entries in scored):
            raise TeacherMismatch(
                f"{self.where} returns no prompt log-probabilities (vLLM's prompt_logprobs); on-policy "
                "distillation needs the teacher's log-probability of every token of the student's replies"
            )
        return scored

    def _failure(self, error: openai.OpenAIError) -> TeacherUnavailable:
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            said = f"HTTP {status}: {brief(error_message(error))}"
            if attempts(error.request) > 1:
                return TeacherUnavailable(
                    f"{self.where} failed after {_tries(error.request)}: {said}", status
                )
            return TeacherUnavailable(f"{self.where} answered {said}", status)
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__
            problem = (
                f"{type(cause).__name__}: {brief(str(cause)) or 'no answer'}" if cause else error.message
            )
            return TeacherUnavailable(f"{self.where} failed after {_tries(error.request)}: {problem}")
        return TeacherUnavailable(f"{self.where} failed: {brief(str(error))}")


def _tries(request: Any) -> str:
    count = attempts(request)
    return f"{count} attempt{'' if count == 1 else 's'}"


def _entry(entries: list[Any], position: int, token_id: int) -> dict[str, Any] | None:
    """The server's record of the token at `position` (a dict keyed by token id, as JSON: a string)."""
    if position >= len(entries) or not isinstance(entries[position], dict):
        return None
    record = entries[position].get(str(token_id), entries[position].get(token_id))  # type: ignore[call-overload]
    return record if isinstance(record, dict) else None


def _distribution(entries: list[Any], position: int) -> dict[int, float] | None:
    """{token id: log-probability, floored} of every token the server listed at `position`; None when a
    listed one is not a number (a NaN)."""
    if position >= len(entries) or not isinstance(entries[position], dict):
        return None
    distribution: dict[int, float] = {}
    for key, record in entries[position].items():
        value = record.get("logprob") if isinstance(record, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return None
        distribution[int(key)] = max(float(value), LOGPROB_FLOOR)
    return distribution


def _same_text(theirs: str, mine: str) -> bool:
    """The same token text, up to the leading-space markers detokenizers add or strip."""

    def plain(text: str) -> str:
        return text.replace("\u2581", " ").replace("\u0120", " ").strip()

    return plain(theirs) == plain(mine)
