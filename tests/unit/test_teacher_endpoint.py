"""The endpoint teacher of `train.method: distill` (`pipeline.train.teacher`), against an HTTP stand-in:
what it asks, how it reads vLLM's `prompt_logprobs`, and every way a teacher fails (no log-probabilities,
a token without one, another tokenizer, a model not served, an endpoint that keeps failing). The real
vLLM server is in `tests/integration/test_distill_endpoint.py`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from pipeline.config import OvernightConfig, TeacherConfig
from pipeline.train.distill import check_teachers
from pipeline.train.teacher import EndpointTeacher, TeacherMismatch, TeacherUnavailable

Handler = Callable[[httpx2.Request], httpx2.Response]


def settings(**overrides: Any) -> TeacherConfig:
    return TeacherConfig.model_validate(
        {"base_url": "http://teacher.test:8000", "model": "big", "max_retries": 0, **overrides}
    )


def teacher(handler: Handler, **overrides: Any) -> EndpointTeacher:
    return EndpointTeacher(
        settings(**overrides), http_client=httpx2.Client(transport=httpx2.MockTransport(handler))
    )


def completion(choices: list[dict[str, Any]]) -> httpx2.Response:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "big", "choices": choices}
    return httpx2.Response(200, json=body)


def choice(index: int, prompt_logprobs: Any, **extra: Any) -> dict[str, Any]:
    fields = {"index": index, "text": "x", "finish_reason": "length", "logprobs": None, **extra}
    if prompt_logprobs is not ...:
        fields["prompt_logprobs"] = prompt_logprobs
    return fields


def scored(
    sequence: list[int], logprob: Callable[[int], float], decode: Callable[[int], str] = str
) -> list[Any]:
    """vLLM's prompt_logprobs for `sequence`: None first, then {id: {logprob, rank, decoded_token}}."""
    return [None] + [
        {str(token): {"logprob": logprob(position), "rank": 1, "decoded_token": decode(token)}}
        for position, token in enumerate(sequence)
        if position > 0
    ]


def echo_handler(seen: list[dict[str, Any]], decode: Callable[[int], str] = str) -> Handler:
    """Answers every completion request with log-probability -position/10 for each given token."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": "big", "object": "model"}]})
        body = json.loads(request.content)
        seen.append({**body, "authorization": request.headers.get("authorization")})
        return completion(
            [
                choice(i, scored(p, lambda position: -position / 10, decode))
                for i, p in enumerate(body["prompt"])
            ]
        )

    return handle


def test_the_teacher_scores_every_reply_token_from_prompt_logprobs() -> None:
    seen: list[dict[str, Any]] = []
    client = teacher(echo_handler(seen))
    scores = client.token_logprobs([[5, 6, 7, 8, 9], [5, 6, 10]], starts=[3, 2])
    assert scores == [[-0.3, -0.4], [-0.2]]  # the reply tokens only: positions 3-4, then position 2
    request = seen[0]
    assert request["prompt"] == [[5, 6, 7, 8, 9], [5, 6, 10]]  # one request for the whole step
    assert request["prompt_logprobs"] == 0 and request["max_tokens"] == 1 and request["model"] == "big"
    assert request["authorization"] is None  # no key configured: no Authorization header at all


def test_an_api_key_is_sent_as_a_bearer_token() -> None:
    seen: list[dict[str, Any]] = []
    teacher(echo_handler(seen), api_key="s3cret").token_logprobs([[1, 2, 3]], starts=[2])
    assert seen[0]["authorization"] == "Bearer s3cret"


def test_a_teacher_that_gives_no_prompt_logprobs_cannot_teach() -> None:
    def plain_openai(request: httpx2.Request) -> httpx2.Response:  # ignores the extension, as most servers
        return completion([choice(0, ...)])

    with pytest.raises(TeacherMismatch) as caught:
        teacher(plain_openai).token_logprobs([[1, 2, 3]], starts=[1])
    assert "returns no prompt log-probabilities" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_reply_token_without_a_log_probability_fails_instead_of_training_on_nothing() -> None:
    def holes(request: httpx2.Request) -> httpx2.Response:
        entries = scored([1, 2, 3, 4], lambda position: -1.0)
        entries[3] = None  # the teacher skipped a reply token
        return completion([choice(0, entries)])

    with pytest.raises(TeacherUnavailable) as caught:
        teacher(holes).token_logprobs([[1, 2, 3, 4]], starts=[2])
    assert "gave no log-probability for token 1 of reply 0" in str(caught.value)


def test_a_nan_log_probability_is_missing_and_minus_infinity_is_floored() -> None:
    def odd(request: httpx2.Request) -> httpx2.Response:
        text = json.dumps(completion([choice(0, scored([1, 2, 3], lambda position: -1.0))]).json())
        return httpx2.Response(200, content=text.replace("-1.0", "NaN", 1).encode())

    with pytest.raises(TeacherUnavailable, match="gave no log-probability for token 0"):
        teacher(odd).token_logprobs([[1, 2, 3]], starts=[1])

    def certain_no(request: httpx2.Request) -> httpx2.Response:
        return completion([choice(0, scored([1, 2], lambda position: -9999.0))])  # vLLM's -inf

    assert teacher(certain_no).token_logprobs([[1, 2]], starts=[1]) == [[-100.0]]


def test_an_endpoint_that_keeps_failing_is_one_line_after_its_retries() -> None:
    calls: list[int] = []

    def down(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(503, json={"error": {"message": "overloaded"}})

    with pytest.raises(TeacherUnavailable) as caught:
        teacher(down, max_retries=1).token_logprobs([[1, 2, 3]], starts=[1])
    message = str(caught.value)
    assert len(calls) == 2 and caught.value.status == 503
    assert (
        message == "teacher big at http://teacher.test:8000/v1 failed after 2 attempts: HTTP 503: overloaded"
    )


def test_a_refused_key_is_not_retried() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(401, json={"error": {"message": "invalid api key"}})

    with pytest.raises(TeacherUnavailable, match=r"answered HTTP 401: invalid api key$"):
        teacher(refuse, api_key="wrong", max_retries=3).token_logprobs([[1, 2]], starts=[1])


def test_the_probe_passes_a_teacher_that_decodes_like_the_student(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen: list[dict[str, Any]] = []
    decode = lambda token: tokenizer.decode([token])  # noqa: E731
    teacher(echo_handler(seen, decode)).probe(tokenizer)
    probed = seen[0]["prompt"][0]
    assert max(probed) == len(tokenizer) - 1  # the probe reaches the last id of the vocabulary


def test_the_probe_refuses_a_teacher_with_another_tokenizer(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shifted = lambda token: tokenizer.decode([(token + 7) % len(tokenizer)])  # noqa: E731
    with pytest.raises(TeacherMismatch) as caught:
        teacher(echo_handler([], shifted)).probe(tokenizer)
    assert "probed token ids otherwise than the base model's tokenizer" in str(caught.value)


def test_the_probe_refuses_a_teacher_whose_vocabulary_is_smaller(tiny_model_dir: Path) -> None:
    def small(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": "big", "object": "model"}]})
        return httpx2.Response(400, json={"error": {"message": "Token id 800 is out of vocabulary"}})

    with pytest.raises(TeacherMismatch) as caught:
        teacher(small).probe(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert str(caught.value) == (
        "teacher big at http://teacher.test:8000/v1 refused the probe (HTTP 400: Token id 800 is out of "
        "vocabulary): it does not share the student's tokenizer, or gives fewer prompt log-probabilities "
        "than train.teacher.top_logprobs=20"
    )


def test_the_probe_refuses_a_model_the_endpoint_does_not_serve(tiny_model_dir: Path) -> None:
    def others(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json={"object": "list", "data": [{"id": "small", "object": "model"}]})

    with pytest.raises(TeacherMismatch, match=r"does not serve 'big' \(it serves small\)$"):
        teacher(others).probe(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_a_teacher_is_a_path_or_an_endpoint() -> None:
    with pytest.raises(ValidationError, match=r"either path .* or base_url and model"):
        TeacherConfig.model_validate({"path": "./big", "base_url": "http://x:1"})
    with pytest.raises(ValidationError, match="either path"):
        TeacherConfig.model_validate({})
    with pytest.raises(ValidationError, match=r"base_url needs train\.teacher\.model"):
        TeacherConfig.model_validate({"base_url": "http://x:1"})
    endpoint = settings(api_key="k")
    assert endpoint.where == "teacher big at http://teacher.test:8000"
    assert "k" not in repr(endpoint.api_key)


def test_an_unreachable_teacher_at_start_is_a_warning_not_a_refusal(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = OvernightConfig.model_validate(
        {
            "serving": {"base_model": str(tiny_model_dir)},
            "tracks": [
                {
                    "name": "student",
                    "train": {
                        "method": "distill",
                        "teacher": {"base_url": "http://127.0.0.1:9", "model": "big", "max_retries": 0},
                    },
                }
            ],
        }
    )
    with caplog.at_level(logging.WARNING):
        check_teachers(config, ["student"])  # the train stage retries it and fails that night alone
    assert "student: teacher big at http://127.0.0.1:9/v1 failed after 1 attempt:" in caplog.text
    assert "its train stage will try again" in caplog.text


def test_the_teacher_lists_its_top_tokens_with_the_sampled_one() -> None:
    def top_two(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        assert body["prompt_logprobs"] == 2
        entries: list[Any] = [None, {"7": {"logprob": -0.1}, "8": {"logprob": -2.5}, "2": {"logprob": -6.0}}]
        return completion([choice(0, entries)])

    rows = teacher(top_two).token_distributions([[1, 2]], starts=[1], top=2)
    assert rows == [[{7: -0.1, 8: -2.5, 2: -6.0}]]  # the sampled token 2 is listed although not in the top 2


def test_the_bucketed_reverse_kl_is_exact_on_the_whole_vocabulary_and_zero_where_nothing_is_listed() -> None:
    import torch

    from pipeline.train.endpoint_distiller import _bucketed_reverse_kl

    torch.manual_seed(0)
    student = torch.log_softmax(torch.randn(2, 3, 50), -1).requires_grad_()
    teacher_ = torch.log_softmax(torch.randn(2, 3, 50), -1)
    listed = torch.ones(2, 3, 50, dtype=torch.bool)
    listed[1, 2] = False  # a padded position: nothing listed
    kl = _bucketed_reverse_kl(student, teacher_, listed)
    exact = (student.exp() * (student - teacher_)).sum(-1)
    assert torch.allclose(kl[0], exact[0], atol=1e-5) and kl[1, 2].item() == 0.0
    (kl * torch.tensor([[1.0, 1, 1], [1, 1, 0]])).sum().backward()
    assert not torch.isnan(student.grad).any()  # type: ignore[arg-type]
    # On a top-3 support the rest of the mass is one bucket: still a divergence, zero only when equal.
    top3 = torch.zeros(2, 3, 50, dtype=torch.bool)
    top3[..., :3] = True
    assert (_bucketed_reverse_kl(student, teacher_, top3)[0] > 0).all()
    assert torch.allclose(_bucketed_reverse_kl(teacher_, teacher_, top3), torch.zeros(2, 3), atol=1e-6)
