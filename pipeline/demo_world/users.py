"""Simulated users of the demo's support track: they chat with the served champion through the
gateway and give feedback through its feedback endpoint, as real users of an application would.

Each user is seeded (the same seed, the same users, questions and verdicts) and has one documented
hidden preference, the thing a learning loop must discover from their thumbs alone:

    a reply is good when it gives the right steps for the question asked (it contains the key
    phrase of the question's intent, e.g. "Settings > Billing > Invoices") and stays short (at
    most `skills.SHORT_REPLY_CHARS` characters): `skills.preference`.

Good replies get a thumb up, and from some users a rating of 4 or 5; right but long replies a thumb
down and a rating of 3; wrong or empty replies a thumb down and a rating of 1 or 2. Not every user
says something (`FEEDBACK_RATE`). The questions are support questions the base never saw in
pretraining and the support suite does not hold (`skills.support_questions`).

The users talk to the gateway with the `openai` SDK (chat completions at temperature 1, as a chat
application samples; the request's `metadata` names the application, `APP`, which the gateway logs
with the exchange and a track can filter on) and post feedback with `httpx`: the gateway logs both
into the store, which is where tomorrow night's harvest finds them. `UsersReport.thumbs_up_rate` is what the demo's table
shows per night: the share of the users' replies they liked.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from pipeline.demo_world import skills

__all__ = ["APP", "UsersReport", "Verdict", "chat_with_users", "verdict"]

APP = "nimbus-chat"  # the application the users chat in: request metadata `{"app": APP}`
FEEDBACK_RATE = 0.85  # share of replies the users give feedback on
RATING_RATE = 0.5  # share of feedback that carries a rating besides the thumb
USERS = 40  # distinct simulated users (ids `sim-user-<n>`)
REPLY_TOKENS = 48  # max_tokens of a user's request


@dataclass(frozen=True)
class Verdict:
    """What a user thought of a reply."""

    liked: bool
    thumb: int  # 1 or -1
    rating: int  # 1..5
    why: str  # "good", "too long", "wrong steps"


def verdict(intent: skills.Intent, reply: str, rng: random.Random) -> Verdict:
    """The hidden preference (`skills.preference`): the right steps in a short reply."""
    why = skills.preference(intent, reply)
    if why == "good":
        return Verdict(True, 1, rng.choice((4, 5, 5)), why)
    if why == "too long":
        return Verdict(False, -1, 3, why)
    return Verdict(False, -1, rng.choice((1, 1, 2)), why)


@dataclass
class UsersReport:
    """One session of the simulated users against one model name."""

    model: str
    asked: int = 0
    liked: int = 0
    feedback_sent: int = 0
    failed: int = 0  # requests the gateway refused or could not answer
    why: dict[str, int] = field(default_factory=dict)
    served_by: dict[str, int] = field(default_factory=dict)  # the version that answered, as logged

    @property
    def thumbs_up_rate(self) -> float | None:
        return self.liked / self.asked if self.asked else None

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "asked": self.asked,
            "liked": self.liked,
            "thumbs_up_rate": self.thumbs_up_rate,
            "feedback_sent": self.feedback_sent,
            "failed": self.failed,
            "why": dict(self.why),
            "served_by": dict(self.served_by),
        }


def chat_with_users(
    gateway_url: str,
    model: str,
    conversations: int,
    *,
    seed: int,
    api_key: str | None = None,
    questions: Sequence[tuple[skills.Intent, str]] | None = None,
    timeout_seconds: float = 60.0,
) -> UsersReport:
    """`conversations` seeded users ask `model` through the gateway at `gateway_url` (its root, e.g.
    http://127.0.0.1:8080) and give feedback on the replies; returns what they thought."""
    from openai import OpenAI, OpenAIError

    rng = random.Random(f"users-{seed}")
    pool = list(questions if questions is not None else skills.support_questions())
    report = UsersReport(model)
    client = OpenAI(
        base_url=f"{gateway_url.rstrip('/')}/v1",
        api_key=api_key or "none",
        max_retries=2,
        timeout=timeout_seconds,
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=gateway_url.rstrip("/"), headers=headers, timeout=timeout_seconds) as http:
        for _ in range(conversations):
            user = f"sim-user-{rng.randrange(USERS)}"
            intent, question = rng.choice(pool)
            try:
                answer = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": question}],
                    temperature=1.0,
                    max_tokens=REPLY_TOKENS,
                    user=user,
                    seed=rng.randrange(2**31),
                    metadata={"app": APP},
                )
            except OpenAIError:
                report.failed += 1
                continue
            reply = answer.choices[0].message.content or ""
            judged = verdict(intent, reply, rng)
            report.asked += 1
            report.liked += judged.liked
            report.why[judged.why] = report.why.get(judged.why, 0) + 1
            report.served_by[answer.model] = report.served_by.get(answer.model, 0) + 1
            if rng.random() < FEEDBACK_RATE:
                body: dict[str, Any] = {"interaction_id": answer.id, "thumb": judged.thumb}
                if rng.random() < RATING_RATE:
                    body["rating"] = judged.rating
                if http.post("/v1/feedback", json=body).status_code == 200:
                    report.feedback_sent += 1
    client.close()
    return report
