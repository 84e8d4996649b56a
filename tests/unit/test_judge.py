"""The judge's I/O half against a real in-process HTTP server: retries, breaker, fallback, cache, budget."""

import asyncio
import time
from pathlib import Path

import pytest

import storage
from pipeline.judge.client import JudgeSettings, JudgeUnavailable, LlmJudge, run_sync
from pipeline.judge.rubrics import load_rubric
from tests.fakes.chat_server import ChatServer, Fault

RUBRIC = load_rubric("helpfulness")
CONVERSATION = [{"role": "user", "content": "How do I reset my password?"}]


def settings(server: ChatServer, **overrides) -> JudgeSettings:
    values = {
        "base_url": server.base_url,
        "model": "judge",
        "timeout_seconds": 2.0,
        "max_retries": 3,
    }
    return JudgeSettings(**{**values, **overrides})


@pytest.fixture
def server():
    with ChatServer() as running:
        yield running


@pytest.fixture
def keep_alive_server():
    """Pooled connections, as with vLLM: a client kept from one event loop to the next would break."""
    with ChatServer(keep_alive=True) as running:
        yield running


def score(judge: LlmJudge, responses: list[str]):
    return run_sync(judge.score(RUBRIC, [CONVERSATION] * len(responses), responses))


def test_pointwise_scores_are_normalised(server: ChatServer) -> None:
    judge = LlmJudge(settings(server))
    good, bad = score(judge, ["GOOD: open Settings > Security", "no idea"])
    assert (good.raw_score, bad.raw_score) == (9, 2)
    assert good.score == pytest.approx(8 / 9) and bad.score == pytest.approx(1 / 9)
    assert judge.stats.judged == 2 and judge.stats.prompt_tokens == 200
    sent = server.state.requests[0]
    assert sent["response_format"]["type"] == "json_schema" and sent["temperature"] == 0.0


def test_group_mode_restores_candidate_order(server: ChatServer) -> None:
    judge = LlmJudge(settings(server, seed=3))
    candidates = ["GOOD one", "bad two", "bad three", "GOOD four"]
    (verdicts,) = run_sync(judge.score_groups(RUBRIC, [CONVERSATION], [candidates]))
    assert [v.raw_score for v in verdicts] == [9, 2, 2, 9]
    shown = server.state.requests[0]["messages"][-1]["content"]
    assert [shown.index(text) for text in candidates] != sorted(shown.index(text) for text in candidates)


def test_group_mode_can_average_two_orders(server: ChatServer) -> None:
    judge = LlmJudge(settings(server, swap_orders=True))
    (verdicts,) = run_sync(judge.score_groups(RUBRIC, [CONVERSATION], [["GOOD a", "bad b"]]))
    assert len(server.state.requests) == 2 and [v.raw_score for v in verdicts] == [9, 2]


@pytest.mark.parametrize(
    "faults",
    [
        [Fault(status=503), Fault(status=503)],
        [Fault(status=429)],
        [Fault(drop=True)],
        [Fault(delay=3.0)],  # longer than the 2 s timeout
    ],
)
def test_transient_failures_are_retried(server: ChatServer, faults: list[Fault]) -> None:
    server.state.faults.extend(faults)
    judge = LlmJudge(settings(server))
    (verdict,) = score(judge, ["GOOD"])
    assert verdict.raw_score == 9 and judge.stats.retries == len(faults)


def test_unreachable_judge_fails_with_one_line() -> None:
    judge = LlmJudge(JudgeSettings(base_url="http://127.0.0.1:9", model="judge", max_retries=2))
    with pytest.raises(JudgeUnavailable) as caught:
        score(judge, ["anything"])
    message = str(caught.value)
    assert "http://127.0.0.1:9/v1/chat/completions failed after 3 attempts: ConnectError" in message
    assert "\n" not in message


def test_circuit_opens_after_consecutive_failures(server: ChatServer) -> None:
    server.state.faults.extend(Fault(status=502) for _ in range(50))
    judge = LlmJudge(settings(server, max_retries=20, breaker_threshold=4, concurrency=1))
    with pytest.raises(JudgeUnavailable, match=r"4 consecutive requests failed \(circuit open\)"):
        score(judge, ["a", "b"])
    assert len(server.state.requests) == 4


def test_client_errors_are_not_retried(server: ChatServer) -> None:
    server.state.faults.append(Fault(status=401, body='{"error": "bad key"}'))
    judge = LlmJudge(settings(server))
    with pytest.raises(JudgeUnavailable, match="HTTP 401"):
        score(judge, ["a"])
    assert len(server.state.requests) == 1


def test_a_rejected_item_fails_alone(server: ChatServer) -> None:
    too_long = '{"error": {"message": "This model\'s maximum context length is 4096 tokens."}}'
    server.state.faults.append(Fault(status=400, body=too_long))
    judge = LlmJudge(settings(server, concurrency=1))
    first, second = score(judge, ["GOOD long", "GOOD short"])
    assert first.status == "failed" and "maximum context length" in (first.error or "")
    assert second.raw_score == 9 and len(server.state.requests) == 2


def test_unparseable_answer_is_retried_then_failed_never_invented(server: ChatServer) -> None:
    server.state.answer_text = "It is a fine answer, I suppose."
    judge = LlmJudge(settings(server, parse_retries=1))
    (verdict,) = score(judge, ["GOOD"])
    assert verdict.score is None and verdict.status == "failed" and "unparseable" in (verdict.error or "")
    assert len(server.state.requests) == 2 and server.state.requests[1]["temperature"] > 0
    assert judge.stats.failed == 1 and judge.stats.judged == 0


def test_falls_back_when_structured_output_is_refused(server: ChatServer) -> None:
    server.state.refuse_response_format = True
    judge = LlmJudge(settings(server))
    good, bad = score(judge, ["GOOD", "meh"])
    assert (good.raw_score, bad.raw_score) == (9, 2)
    assert "response_format" not in server.state.requests[-1]


def test_cache_hits_cost_no_call_and_failures_are_not_cached(server: ChatServer, tmp_path: Path) -> None:
    engine = storage.make_engine(f"sqlite:///{tmp_path / 'cache.db'}")
    storage.upgrade(engine)
    responses = ["GOOD 1", "bad 2", "GOOD 3"]
    first = score(LlmJudge(settings(server), engine=engine), responses)
    calls = len(server.state.requests)
    again = LlmJudge(settings(server), engine=engine)
    second = score(again, responses)
    assert len(server.state.requests) == calls and again.stats.cache_hits == 3
    assert [v.score for v in second] == [v.score for v in first] and all(v.cached for v in second)
    other_rubric = run_sync(again.score(load_rubric("concision"), [CONVERSATION], ["GOOD 1"]))
    assert len(server.state.requests) == calls + 1 and not other_rubric[0].cached

    server.state.answer_text = "no verdict"
    failing = LlmJudge(settings(server, parse_retries=0), engine=engine)
    assert score(failing, ["fresh"])[0].status == "failed"
    server.state.answer_text = None
    retried = LlmJudge(settings(server), engine=engine)
    assert score(retried, ["fresh"])[0].raw_score == 2 and retried.stats.cache_hits == 0


def test_budget_caps_judged_items(server: ChatServer) -> None:
    judge = LlmJudge(settings(server, budget_items=2))
    verdicts = score(judge, ["GOOD a", "b", "c", "d"])
    assert [v.status for v in verdicts].count("skipped") == 2 and judge.stats.judged == 2
    assert all(v.score is None for v in verdicts if v.status == "skipped")


def test_retry_after_is_honoured(server: ChatServer) -> None:
    server.state.faults.append(Fault(status=429, headers={"Retry-After": "1"}))
    judge = LlmJudge(settings(server))
    started = time.monotonic()
    (verdict,) = score(judge, ["GOOD"])
    assert verdict.raw_score == 9 and judge.stats.retries == 1
    assert time.monotonic() - started >= 1.0  # the backoff alone would wait at most 0.5 s


def test_budget_holds_across_calls_on_one_instance(keep_alive_server: ChatServer) -> None:
    server = keep_alive_server
    judge = LlmJudge(settings(server, budget_items=3))  # one instance per night, one event loop per call
    first = score(judge, ["GOOD a", "b"])
    second = score(judge, ["GOOD c", "d"])
    assert [v.status for v in first + second] == ["ok", "ok", "ok", "skipped"]
    assert (judge.stats.judged, judge.stats.skipped, judge.stats.calls) == (3, 1, 3)
    assert judge.stats.prompt_tokens == 300 and len(server.state.requests) == 3


def test_open_circuit_stays_open_for_the_next_call(server: ChatServer) -> None:
    server.state.faults.extend(Fault(status=503) for _ in range(10))
    judge = LlmJudge(settings(server, max_retries=5, breaker_threshold=2))
    with pytest.raises(JudgeUnavailable, match="circuit open"):
        score(judge, ["a"])
    with pytest.raises(JudgeUnavailable, match=r"2 consecutive requests failed \(circuit open\)"):
        score(judge, ["b"])
    assert len(server.state.requests) == 2 and judge.stats.calls == 2


def test_an_open_circuit_lets_one_request_through_after_its_cooldown(server: ChatServer) -> None:
    """A stage retried later in the night (Prefect waits between tries) reaches a recovered judge."""
    server.state.faults.extend(Fault(status=503) for _ in range(2))
    judge = LlmJudge(settings(server, max_retries=5, breaker_threshold=2, breaker_cooldown_seconds=0.3))
    with pytest.raises(JudgeUnavailable, match="circuit open"):
        score(judge, ["a"])
    time.sleep(0.4)  # the endpoint recovered meanwhile (no faults left)

    (result,) = score(judge, ["GOOD answer"])

    assert result.status == "ok" and result.score is not None and len(server.state.requests) == 3


def test_overlapping_calls_on_one_loop_then_a_call_on_another(keep_alive_server: ChatServer) -> None:
    judge = LlmJudge(settings(keep_alive_server))

    async def both():
        return await asyncio.gather(
            judge.score(RUBRIC, [CONVERSATION], ["GOOD"]),
            judge.score_groups(RUBRIC, [CONVERSATION], [["GOOD x", "bad y"]]),
        )

    pointwise, groups = run_sync(both())
    assert pointwise[0].raw_score == 9 and [v.raw_score for v in groups[0]] == [9, 2]
    assert score(judge, ["bad"])[0].raw_score == 2  # and a later call, on a new loop, still works


def test_api_key_is_sent_only_when_configured(server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-this-endpoint")
    score(LlmJudge(settings(server)), ["GOOD"])
    score(LlmJudge(settings(server, api_key="judge-key")), ["GOOD"])
    assert [h.get("authorization") for h in server.state.headers] == [None, "Bearer judge-key"]


def test_compact_prompt_sends_the_compact_messages_and_schema(server: ChatServer) -> None:
    judge = LlmJudge(settings(server, prompt="compact"))
    good, bad = score(judge, ["GOOD: open Settings > Security", "no idea"])
    assert (good.raw_score, bad.raw_score) == (9, 2)
    sent = server.state.requests[0]
    assert sent["messages"][0]["content"].startswith('Judge the RESPONSE to the CONVERSATION by the rubric "')
    schema = sent["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["score"] and list(schema["properties"]) == ["score"]


def test_compact_group_mode_scores_each_candidate_pointwise(server: ChatServer) -> None:
    judge = LlmJudge(settings(server, prompt="compact"))
    groups = [["GOOD one", "bad two", "GOOD three"], ["bad four", "GOOD five"]]
    conversations = [CONVERSATION, [{"role": "user", "content": "And my username?"}]]
    verdicts = run_sync(judge.score_groups(RUBRIC, conversations, groups))
    assert [[v.raw_score for v in group] for group in verdicts] == [[9, 2, 9], [2, 9]]
    assert len(server.state.requests) == 5 and judge.stats.judged == 5
    for sent in server.state.requests:
        assert "scores" not in sent["response_format"]["json_schema"]["schema"]["properties"]
        user = sent["messages"][1]["content"]
        assert user.count("<<<RESPONSE>>>") == 1 and "CANDIDATE" not in user
    shown = [sent["messages"][1]["content"] for sent in server.state.requests]
    assert any("And my username?" in user and "GOOD five" in user for user in shown)


def test_compact_group_mode_judges_repeated_candidates_once(server: ChatServer) -> None:
    judge = LlmJudge(settings(server, prompt="compact"))
    groups = [["GOOD x", "same", "same"], ["same", "GOOD x"]]
    verdicts = run_sync(judge.score_groups(RUBRIC, [CONVERSATION] * 2, groups))
    assert [[v.raw_score for v in group] for group in verdicts] == [[9, 2, 2], [2, 9]]
    assert len(server.state.requests) == 2 and judge.stats.judged == 2


def test_compact_group_mode_honours_budget_and_cache(server: ChatServer, tmp_path: Path) -> None:
    engine = storage.make_engine(f"sqlite:///{tmp_path / 'cache.db'}")
    storage.upgrade(engine)
    groups = [["GOOD a", "b"], ["GOOD c", "d"]]
    capped = LlmJudge(settings(server, prompt="compact", budget_items=3), engine=engine)
    first = run_sync(capped.score_groups(RUBRIC, [CONVERSATION] * 2, groups))
    assert [[v.status for v in group] for group in first] == [["ok", "ok"], ["ok", "skipped"]]
    assert len(server.state.requests) == 3

    again = LlmJudge(settings(server, prompt="compact"), engine=engine)
    second = run_sync(again.score_groups(RUBRIC, [CONVERSATION] * 2, groups))
    assert [[v.raw_score for v in group] for group in second] == [[9, 2], [9, 2]]
    assert again.stats.cache_hits == 3 and len(server.state.requests) == 4
    full = LlmJudge(settings(server), engine=engine)  # verdicts of one style never serve the other
    assert not score(full, ["GOOD a"])[0].cached and len(server.state.requests) == 5


def test_unknown_prompt_style_is_refused() -> None:
    with pytest.raises(ValueError, match="'tiny' is not one of full, compact"):
        JudgeSettings(base_url="http://127.0.0.1:9", model="judge", prompt="tiny")
