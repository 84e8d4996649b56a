"""Deterministic synthetic chat traffic for the demo, the tests and the benchmarks.

The nightly pipeline starts from what a chat application logs: one interaction record per served
answer, one JSON object per JSONL line. Real logs cannot ship with the repository (they hold personal
data and belong to someone), yet every stage after ingest needs input that looks and misbehaves like
them: prompts re-typed with different case or punctuation, a few users who send most of the traffic,
users who did not consent to training, personal data and secrets pasted into questions, answers of
uneven quality, feedback that follows quality only loosely, and lines that are not valid records.

Everything here is derived from a seed with `random.Random` and `hashlib`, with no clock and no global
state, so the same arguments give byte-identical output on any machine: tests can pin exact numbers and
a benchmark can be rerun. Records carry ground truth in `metadata` that real traffic would not have
(`answer` and `expression` for math; `topic`, `quality` and `pii` for support). Graders, tests and
benchmarks may read it; the pipeline itself must not depend on it.

Fake card numbers and IBANs get their check digits from python-stdnum (`luhn.calc_check_digit`,
`iban.calc_check_digits`), so they pass the checks redaction applies; only the random digits, issuer
prefixes and layouts are chosen here.

The only I/O is `write_jsonl`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from stdnum import iban, luhn

# Tracks this generator can produce.
TRACKS: tuple[str, ...] = ("support", "math")
# Default first timestamp; fixed so that output with default arguments is byte-stable.
DEFAULT_START = datetime(2026, 11, 21, tzinfo=UTC)
# Distinct users; ids depend only on the index, so consecutive "nights" (seeds) see the same users.
USER_POOL_SIZE = 60
# Users who send far more than their share of traffic, so a per-user cap has something to cut.
HEAVY_USER_COUNT = 3
# Share of conversations sent by the heavy users together (about 8% each against ~1.3% for the others).
HEAVY_USER_SHARE = 0.25
# Share of conversations that open with an earlier prompt re-typed (case, whitespace, punctuation).
DUPLICATE_RATE = 0.08
# Share of support user turns that paste personal data or a secret (email, phone, card, IBAN, IP, key).
PII_RATE = 0.2
# Share of support conversations with 2-3 user turns; each turn is logged as its own record.
MULTI_TURN_RATE = 0.15
# Share of conversations whose user did not consent to training use (`consent: false`).
CONSENT_FALSE_RATE = 0.03
# Share of consenting conversations that leave `consent` out and rely on its default (true).
CONSENT_OMITTED_RATE = 0.3
# Share of single-turn conversations that still carry a `session_id` (multi-turn ones always do).
SESSION_ID_RATE = 0.5
# Share of support answers padded to several thousand characters.
LONG_RESPONSE_RATE = 0.01
# Length range, in characters, of those padded answers.
LONG_RESPONSE_CHARS = (6_000, 16_000)
# Share of records on which the user left any feedback.
FEEDBACK_RATE = 0.5
# Default share of math answers that are wrong (a keyword argument of `generate_records`).
MATH_ERROR_RATE = 0.25
# Share of math conversations that start with a system prompt.
MATH_SYSTEM_PROMPT_RATE = 0.3
# How often each kind of support answer is served; everything but "good" counts as bad for feedback.
SUPPORT_QUALITY_WEIGHTS: Mapping[str, float] = {"good": 0.6, "curt": 0.15, "wrong": 0.15, "off_topic": 0.1}
# Chance that a user who got a good (or correct) answer leaves positive feedback.
SATISFIED_IF_GOOD = 0.85
# Chance that a user who got a bad (or wrong) answer still leaves positive feedback.
SATISFIED_IF_BAD = 0.2
# Star weights for 1..5 given a satisfied user; unsatisfied users get them reversed.
SATISFIED_RATING_WEIGHTS = (0.0, 0.02, 0.1, 0.38, 0.5)
# Feedback shapes (the keys present) and their weights: real users rarely fill in everything.
FEEDBACK_SHAPES: tuple[tuple[tuple[str, ...], float], ...] = (
    (("thumb",), 0.5),
    (("rating",), 0.15),
    (("thumb", "rating"), 0.2),
    (("thumb", "comment"), 0.1),
    (("thumb", "rating", "comment"), 0.05),
)
# Model versions a track is served by, with weights; a bare track name means "whatever was live".
MODEL_VERSION_WEIGHTS: tuple[tuple[str, float], ...] = (("@v3", 0.6), ("@v2", 0.25), ("", 0.15))
# Clients the application runs on, recorded in metadata.
CLIENTS = ("web", "ios", "android", "api")
# Seconds between two turns of one session.
TURN_GAP_SECONDS = (30, 420)

SUPPORT_SYSTEM_PROMPT = (
    "You are the support assistant for Nimbus Notes, a note-taking app with Free, Plus ($8/month) and "
    "Team ($15 per user/month) plans, and the Nimbus Pen stylus sold in our shop. Policy: subscriptions "
    "renew on the sign-up day each month; purchases are fully refundable within 30 days, to the original "
    "payment method; password reset links expire after 1 hour; the Pen ships within 2 business days and "
    "arrives in 3-5; deleted accounts are purged after 14 days; the API allows 60 requests per minute per "
    "key. Be accurate, brief and polite. Never ask for passwords, full card numbers or API keys."
)
MATH_SYSTEM_PROMPT = "You are a careful math tutor. Give the final answer as a number."


@dataclass(frozen=True)
class _Topic:
    """A support topic: question and follow-up templates with their good answers, and bad answers."""

    name: str
    questions: tuple[tuple[str, str], ...]
    followups: tuple[tuple[str, str], ...]
    curt: tuple[str, ...]
    wrong: tuple[str, ...]


_TOPICS: tuple[_Topic, ...] = (
    _Topic(
        name="billing",
        questions=(
            (
                "Why was I charged {amount} twice this month?",
                "Sorry for the worry! A second charge of {amount} is usually a pending authorization from a "
                "retried renewal; it drops off within 3 business days. If both charges settle, reply here "
                "and we will refund the duplicate right away.",
            ),
            (
                "How do I download my invoice for {month}?",
                'Every invoice is under Settings > Billing > Invoices. Pick {month} and click "Download PDF". '
                "If it is missing, tell me and I will email it to you.",
            ),
            (
                "Can I switch from {plan} to {other_plan} in the middle of my billing cycle?",
                "Yes, you can switch at any time under Settings > Billing > Change plan. The change applies "
                "immediately and the price difference is prorated on your next invoice.",
            ),
            (
                "my card got declined when the {plan} plan renewed, what now",
                "Sorry about that! Please update your card under Settings > Billing > Payment method. We "
                "retry the renewal within 24 hours, and your notes stay available in the meantime.",
            ),
            (
                "On which day will I be billed for the {plan} plan?",
                "Subscriptions renew on the same day of the month you signed up. The exact next billing "
                "date is shown under Settings > Billing.",
            ),
        ),
        followups=(
            (
                "And what if I get charged {amount} twice by mistake?",
                "Then reply here with the dates of both charges and we will refund the duplicate; it "
                "reaches your original payment method within 5-10 business days.",
            ),
            (
                "Will I lose my notes if the payment fails?",
                "No, notes are never deleted because of a failed payment. If renewal keeps failing, the "
                "account moves to the Free plan and every note stays readable.",
            ),
            (
                "Do you have VAT invoices?",
                "Yes. Add your VAT number under Settings > Billing > Tax details and every invoice from "
                "then on will show it.",
            ),
        ),
        curt=("Check Settings.", "It's on your invoice.", "We don't handle that here."),
        wrong=(
            "Subscriptions renew on the 1st of every month for all customers, so that charge is correct.",
            "Plan changes only take effect after 90 days.",
            "Failed payments delete the account after 24 hours, so pay quickly.",
        ),
    ),
    _Topic(
        name="password_reset",
        questions=(
            (
                "I forgot my password, how do I reset it?",
                'No problem! Click "Forgot password" on the sign-in page and enter your account email. '
                "We will send a reset link that is valid for 1 hour.",
            ),
            (
                "The password reset email never arrived.",
                "Sorry about that. Please check your spam folder and make sure you used the email on the "
                "account. Links expire after 1 hour, so request a new one if it has been longer.",
            ),
            (
                "Reset link says expired?? I clicked it after {minutes} minutes",
                "Reset links are valid for 1 hour and only the newest link works. Please request a fresh "
                "one from the sign-in page and use it right away.",
            ),
            (
                "How do I change my password when I'm already logged in?",
                "Go to Settings > Security > Change password. You need your current password; if you don't "
                'remember it, sign out and use "Forgot password" instead.',
            ),
        ),
        followups=(
            (
                "I tried that and I'm still locked out.",
                "Sorry it's still not working. I have sent a fresh reset link from our backup mail server; "
                "it can take up to 10 minutes. If it doesn't arrive, we can verify your identity another way.",
            ),
            (
                "Will resetting sign me out on my phone?",
                "Yes, a password reset signs you out on every device for security. Just sign in again "
                "with the new password.",
            ),
        ),
        curt=("Use the reset link.", "Try again.", "Can't help with passwords."),
        wrong=(
            "Reset links are valid for 7 days, so there's no rush.",
            "Please reply with your current password and I will reset it for you.",
            "Passwords can only be reset by calling our office.",
        ),
    ),
    _Topic(
        name="shipping",
        questions=(
            (
                "Where is my Nimbus Pen? Order {order} hasn't arrived.",
                "Sorry for the wait! Pens ship within 2 business days and usually arrive in 3-5. Order "
                "{order} has shipped; the tracking link is in your confirmation email.",
            ),
            (
                "How long does shipping to {country} take?",
                "Orders ship within 2 business days; standard delivery to {country} then takes 3-5 "
                "business days. You get a tracking link by email once it ships.",
            ),
            (
                "Can I change the delivery address for order {order}?",
                "If order {order} hasn't shipped yet, yes: reply with the new address and I will update it. "
                "Once it has shipped, the carrier's tracking page lets you redirect it.",
            ),
            (
                "The pen arrived damaged. What do I do?",
                "I'm sorry it arrived damaged! Send us a photo in this chat and we will ship a replacement "
                "free of charge; there is no need to return the broken one.",
            ),
        ),
        followups=(
            (
                "The tracking page hasn't updated in {stalled_days} days.",
                "Thanks for letting me know. I've opened a trace with the carrier; if the parcel doesn't "
                "move within 2 business days we will send a replacement at no cost.",
            ),
            (
                "Can I get express shipping instead?",
                "Express delivery (1-2 business days) can be chosen at checkout for new orders. Order "
                "{order} has already left with standard shipping.",
            ),
        ),
        curt=("It's shipped.", "Ask the carrier.", "Wait a few more days."),
        wrong=(
            "Nimbus Pens are shipped 6-8 weeks after ordering.",
            "We don't ship to {country}.",
            "Damaged items must be returned at your own cost before we can do anything.",
        ),
    ),
    _Topic(
        name="refund",
        questions=(
            (
                "I want a refund for {plan}, I only bought it {days_ago} days ago.",
                "Of course. Purchases are fully refundable within 30 days, so you qualify. I've started the "
                "refund to your original payment method; it takes 5-10 business days to appear.",
            ),
            (
                "How long do refunds take?",
                "Once approved, refunds reach your original payment method within 5-10 business days, "
                "depending on your bank.",
            ),
            (
                "Can I get my refund as store credit instead of on my card?",
                "Refunds normally go back to the original payment method, but if you prefer I can add "
                "{amount} of credit to your account instead. Just confirm here.",
            ),
            (
                "I was charged {amount} after I cancelled. I want my money back.",
                "Sorry about that, a charge after cancelling shouldn't happen. I've refunded {amount} to "
                "your original payment method; it will show within 5-10 business days.",
            ),
        ),
        followups=(
            (
                "It's been two weeks and I don't see the refund.",
                "Sorry for the delay. The refund was issued on our side; some banks take up to 10 "
                "business days. I've added the refund reference to this chat so your bank can trace it.",
            ),
            (
                "Will I keep the {plan} features until then?",
                "Yes, you keep the {plan} features until the end of the current billing period; then the "
                "account moves to the Free plan.",
            ),
        ),
        curt=("Refund requested.", "Read the refund policy.", "No."),
        wrong=(
            "Refunds are only possible within 48 hours of purchase.",
            "We only refund in cash at our office.",
            "Subscriptions are non-refundable under any circumstances.",
        ),
    ),
    _Topic(
        name="account_deletion",
        questions=(
            (
                "How do I delete my account?",
                "You can delete it under Settings > Account > Delete account. Your data is purged after 14 "
                "days; until then you can cancel the deletion by signing in.",
            ),
            (
                "Please delete all my data, I'm leaving.",
                "Sorry to see you go. Settings > Account > Delete account starts it, and everything is "
                "permanently removed after 14 days. If you can't sign in, reply here and we'll verify you.",
            ),
            (
                "If I delete my account can I get my notes back later?",
                "Within 14 days of deleting you can sign in to cancel it and everything comes back. After "
                "that the data is purged for good, so export your notes first under Settings > Export.",
            ),
        ),
        followups=(
            (
                "Does that cancel my {plan} subscription too?",
                "Yes, deleting the account cancels the {plan} subscription immediately and you won't be "
                "charged again.",
            ),
            (
                "Can I export my notes first?",
                "Yes: Settings > Export creates a ZIP of all notes in Markdown, ready in a few minutes.",
            ),
        ),
        curt=("Settings > Account.", "Just uninstall the app."),
        wrong=(
            "Deleted accounts are kept for 5 years and can't be purged.",
            "Uninstalling the app deletes your account and data immediately.",
            "Account deletion is only available on the Team plan.",
        ),
    ),
    _Topic(
        name="api_usage",
        questions=(
            (
                "How do I authenticate with the Nimbus API?",
                "Create a key under Settings > Developer and send it as a bearer token: "
                "`Authorization: Bearer <your key>`. Keep the key secret and out of client-side code.",
            ),
            (
                "I keep getting HTTP 429 from the API.",
                "A 429 means you hit the limit of 60 requests per minute per key. Wait for the number of "
                "seconds in the `Retry-After` header and add backoff to your client.",
            ),
            (
                "Is there an endpoint to list all notes in a notebook?",
                "Yes: `GET /v1/notebooks/<id>/notes` returns the notes page by page; pass the `cursor` "
                "from each response to get the next page.",
            ),
            (
                "My API key stopped working today, requests return 401.",
                "A 401 means the key is invalid or was revoked; keys found in public repositories are "
                "revoked automatically. Create a new key under Settings > Developer and update your client.",
            ),
        ),
        followups=(
            (
                "Can I raise the rate limit?",
                "Team plans can ask for up to 600 requests per minute; reply with your workspace name and "
                "expected volume and we'll review it.",
            ),
            (
                "Should I rotate keys regularly?",
                "Yes, we recommend rotating keys every 90 days. Two keys can be active while you switch over.",
            ),
        ),
        curt=("Read the docs.", "Your code is wrong.", "API questions go to the forum."),
        wrong=(
            "The API has no rate limit, so a 429 must be a network problem on your side.",
            "Send your key as a `?key=` query parameter in the URL; that's the recommended way.",
            "Paste your API key here and I'll check it for you.",
        ),
    ),
)

_OFF_TOPIC = (
    "Our office is closed on public holidays.",
    "Did you know Nimbus Notes has a dark mode? Try it under Settings > Appearance!",
    "Thanks for your feedback about the mobile widget!",
    "Great question! Nimbus Notes syncs across all your devices.",
    "Please rate us 5 stars in the app store.",
)

_LONG_FILLER = (
    "To make sure nothing is missed, here is the full background.",
    "Our policies are designed to be fair to every customer and are reviewed every quarter.",
    "If any step is unclear, the help centre has screenshots for the web, iOS and Android apps.",
    "Please note that some banks and carriers add their own processing time on top of ours.",
    "We also recommend keeping your app up to date, since many issues are fixed in newer versions.",
    "Your data is stored in encrypted form and our staff can only see it when you ask us to.",
)

_SLOT_VALUES: Mapping[str, tuple[str, ...]] = {
    "amount": ("$8.00", "$15.00", "$96.00", "£7.00", "€8.50", "$180.00"),
    "plan": ("Plus", "Team"),
    "month": ("March", "June", "September", "October", "November"),
    "country": ("Germany", "Canada", "Japan", "the UK", "Brazil", "Australia"),
}

_FEEDBACK_COMMENTS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # (unsatisfied, satisfied)
    "support": (
        ("That's not what I asked.", "Wrong, your own policy says otherwise.", "Not helpful.", "Rude."),
        ("Thanks, that worked!", "Quick and clear.", "Perfect, exactly what I needed.", "Très bien, merci !"),
    ),
    "math": (
        ("That's wrong, I checked with a calculator.", "Incorrect.", "No, try again."),
        ("Correct, thanks!", "Right answer.", "👍 spot on"),
    ),
}

_FIRST_NAMES = ("anna", "ben", "chloe", "david", "emma", "farid", "grace", "hiro", "ines", "jonas", "kofi")
_LAST_NAMES = ("smith", "nguyen", "garcia", "muller", "okafor", "rossi", "tanaka", "kowalski")
_EMAIL_DOMAINS = ("example.com", "example.org", "mail.example.net")
_WORD_PROBLEM_NAMES = ("Maya", "José", "Zoë", "Liam", "Aiko", "Omar")


# ---------------------------------------------------------------- personal data


def _group(text: str, size: int, sep: str) -> str:
    return sep.join(text[i : i + size] for i in range(0, len(text), size))


def _digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(count))


def _fake_email(rng: random.Random) -> str:
    name = f"{rng.choice(_FIRST_NAMES)}.{rng.choice(_LAST_NAMES)}{rng.randint(1, 99)}"
    return f"{name}@{rng.choice(_EMAIL_DOMAINS)}"


def _fake_phone(rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"+44 20 7946 0{_digits(rng, 3)}"
    if style == 1:
        return f"(555) {_digits(rng, 3)}-{_digits(rng, 4)}"
    return f"07700 900{_digits(rng, 3)}"


def _fake_card(rng: random.Random) -> str:
    """A 16-digit number that passes the Luhn check, formatted as people type it."""
    if rng.random() < 0.2:
        number = "4111111111111111"
    else:
        payload = rng.choice(("4", "51", "52", "55"))
        payload += _digits(rng, 15 - len(payload))
        number = payload + luhn.calc_check_digit(payload)
    return _group(number, 4, rng.choice((" ", "-", "")))


def _fake_iban(rng: random.Random) -> str:
    """A GB or DE IBAN with valid mod-97 check digits, grouped by four or compact."""
    if rng.random() < 0.6:
        country, bban = "GB", rng.choice(("WEST", "NWBK", "BARC")) + _digits(rng, 14)
    else:
        country, bban = "DE", _digits(rng, 18)
    number = country + iban.calc_check_digits(f"{country}00{bban}") + bban
    return iban.format(number) if rng.random() < 0.7 else number


def _fake_ipv4(rng: random.Random) -> str:
    prefix = rng.choice(
        ("192.0.2", "198.51.100", "203.0.113", f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}")
    )
    return f"{prefix}.{rng.randint(1, 254)}"


def _fake_api_key(rng: random.Random) -> str:
    body = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(32, 48)))
    return rng.choice(("sk-", "sk-live-", "sk-proj-")) + body


_PII_MAKERS: Mapping[str, Callable[[random.Random], str]] = {
    "email": _fake_email,
    "phone": _fake_phone,
    "card": _fake_card,
    "iban": _fake_iban,
    "ipv4": _fake_ipv4,
    "api_key": _fake_api_key,
}

_PII_SENTENCES: Mapping[str, tuple[str, ...]] = {
    "email": ("My account email is {value}.", "You can reach me at {value}"),
    "phone": ("Call me on {value} if that's easier.", "My phone number is {value}."),
    "card": ("It was charged to my card {value}.", "card number {value}"),
    "iban": ("Please send the money to {value}.", "My IBAN is {value}."),
    "ipv4": ("Our server at {value} gets the errors.", "my IP is {value} if that helps"),
    "api_key": ("Here is my key: {value}", "I'm using the key {value}."),
}


def _add_pii(rng: random.Random, text: str) -> tuple[str, list[str]]:
    """`text` with one or (rarely) two pieces of personal data appended, and their kinds."""
    kinds = rng.sample(sorted(_PII_MAKERS), k=2 if rng.random() < 0.1 else 1)
    for kind in kinds:
        sentence = rng.choice(_PII_SENTENCES[kind]).format(value=_PII_MAKERS[kind](rng))
        text = f"{text} {sentence}"
    return text, kinds


# ---------------------------------------------------------------- near-duplicates


def _lowercase(text: str) -> str:
    return text.lower() if text != text.lower() else text.capitalize()


def _extra_spaces(text: str) -> str:
    return text.replace(" ", "  ", 1) if " " in text else f" {text}"


def _edge_whitespace(text: str) -> str:
    return f"  {text}\n"


def _end_punctuation(text: str) -> str:
    stripped = text.rstrip("?.!")
    return stripped if stripped != text else f"{text}?"


def _more_punctuation(text: str) -> str:
    return f"{text}!!" if text.endswith(("?", "!")) else f"{text}..."


_CASE_OPS: tuple[Callable[[str], str], ...] = (_lowercase,)
_SAFE_OPS: tuple[Callable[[str], str], ...] = (
    _extra_spaces,
    _edge_whitespace,
    _end_punctuation,
    _more_punctuation,
)


def _retype(rng: random.Random, text: str, *, keep_case: bool) -> str:
    """`text` re-typed: differs in raw form, equal after case/whitespace/punctuation folding."""
    ops = _SAFE_OPS if keep_case else _SAFE_OPS + _CASE_OPS
    out = text
    for op in rng.sample(ops, k=rng.randint(1, 2)):
        out = op(out)
    return out if out != text else f"{text} "


# ---------------------------------------------------------------- records under construction


@dataclass
class _Draft:
    """A record before it gets its timestamp (from `offset`) and its id (from its final position)."""

    offset: int
    seq: int
    track: str
    user_id: str
    session_id: str | None
    messages: list[dict[str, str]]
    response: str
    model: str
    feedback: dict[str, Any] | None
    metadata: dict[str, Any]
    consent: bool | None


@dataclass(frozen=True)
class _Context:
    """Per-conversation choices shared by all of its records."""

    user_id: str
    session_id: str | None
    model: str
    client: str
    consent: bool | None
    offset: int


@dataclass(frozen=True)
class _Question:
    """A support question as first asked, kept so a later conversation can re-type it."""

    topic: _Topic
    text: str
    good_answer: str
    pii: tuple[str, ...]
    slots: Mapping[str, str]


@dataclass(frozen=True)
class _Problem:
    """A math prompt, the Python expression it stands for, and its value."""

    text: str
    expression: str
    answer: int


@dataclass
class _State:
    """What the generator remembers across conversations."""

    rng: random.Random
    seed: int
    span_seconds: int
    math_error_rate: float
    users: tuple[str, ...]
    math_maker: Callable[[random.Random], tuple[str, str, int]] | None = None
    math_system_prompt_rate: float = MATH_SYSTEM_PROMPT_RATE
    drafts: list[_Draft] = field(default_factory=list)
    support_seen: list[_Question] = field(default_factory=list)
    math_seen: list[_Problem] = field(default_factory=list)
    conversations: int = 0


def _digest(*parts: object) -> str:
    return hashlib.sha256(":".join(str(part) for part in parts).encode()).hexdigest()


def _user_pool() -> tuple[str, ...]:
    return tuple(f"u_{_digest('user', index)[:10]}" for index in range(USER_POOL_SIZE))


def _pick_user(state: _State) -> str:
    heavy, regular = state.users[:HEAVY_USER_COUNT], state.users[HEAVY_USER_COUNT:]
    return state.rng.choice(heavy if state.rng.random() < HEAVY_USER_SHARE else regular)


def _pick_consent(rng: random.Random) -> bool | None:
    if rng.random() < CONSENT_FALSE_RATE:
        return False
    return None if rng.random() < CONSENT_OMITTED_RATE else True


def _weighted(rng: random.Random, pairs: Iterable[tuple[Any, float]]) -> Any:
    values, weights = zip(*pairs, strict=True)
    return rng.choices(values, weights=weights)[0]


def _new_context(state: _State, track: str, *, multi_turn: bool) -> _Context:
    rng = state.rng
    state.conversations += 1
    with_session = multi_turn or rng.random() < SESSION_ID_RATE
    return _Context(
        user_id=_pick_user(state),
        session_id=f"s_{_digest(state.seed, 'session', state.conversations)[:16]}" if with_session else None,
        model=track + _weighted(rng, MODEL_VERSION_WEIGHTS),
        client=rng.choice(CLIENTS),
        consent=_pick_consent(rng),
        offset=rng.randrange(state.span_seconds),
    )


def _feedback(rng: random.Random, track: str, *, good: bool) -> dict[str, Any] | None:
    """Feedback loosely following answer quality, with a random subset of keys, or none."""
    if rng.random() >= FEEDBACK_RATE:
        return None
    satisfied = rng.random() < (SATISFIED_IF_GOOD if good else SATISFIED_IF_BAD)
    keys = _weighted(rng, FEEDBACK_SHAPES)
    weights = SATISFIED_RATING_WEIGHTS if satisfied else SATISFIED_RATING_WEIGHTS[::-1]
    feedback: dict[str, Any] = {}
    if "thumb" in keys:
        feedback["thumb"] = 1 if satisfied else -1
    if "rating" in keys:
        feedback["rating"] = rng.choices(range(1, 6), weights=weights)[0]
    if "comment" in keys:
        feedback["comment"] = rng.choice(_FEEDBACK_COMMENTS[track][int(satisfied)])
    return feedback


def _add_draft(state: _State, ctx: _Context, turn_offset: int, **fields: Any) -> None:
    offset = min(ctx.offset + turn_offset, state.span_seconds - 1)
    state.drafts.append(
        _Draft(
            offset=offset,
            seq=len(state.drafts),
            user_id=ctx.user_id,
            session_id=ctx.session_id,
            model=ctx.model,
            consent=ctx.consent,
            **fields,
        )
    )


# ---------------------------------------------------------------- support track


def _fill_slots(rng: random.Random) -> dict[str, str]:
    slots = {name: rng.choice(values) for name, values in _SLOT_VALUES.items()}
    slots["other_plan"] = "Team" if slots["plan"] == "Plus" else "Plus"
    slots["order"] = f"NB-{rng.randint(10_000, 99_999)}"
    slots["minutes"] = str(rng.randint(65, 240))
    slots["days_ago"] = str(rng.randint(1, 25))
    slots["stalled_days"] = str(rng.randint(3, 9))
    return slots


def _new_question(state: _State) -> _Question:
    rng = state.rng
    topic = rng.choice(_TOPICS)
    slots = _fill_slots(rng)
    question, answer = rng.choice(topic.questions)
    text, pii = question.format(**slots), []
    if rng.random() < PII_RATE:
        text, pii = _add_pii(rng, text)
    found = _Question(topic, text, answer.format(**slots), tuple(pii), slots)
    state.support_seen.append(found)
    return found


def _support_question(state: _State) -> _Question:
    rng = state.rng
    if state.support_seen and rng.random() < DUPLICATE_RATE:
        seen = rng.choice(state.support_seen)
        text = _retype(rng, seen.text, keep_case=bool(seen.pii))
        return _Question(seen.topic, text, seen.good_answer, seen.pii, seen.slots)
    return _new_question(state)


def _long_answer(rng: random.Random, answer: str) -> str:
    target = rng.randint(*LONG_RESPONSE_CHARS)
    parts, length, step = [answer], len(answer), 0
    while length < target:
        step += 1
        line = f"{step}. {rng.choice(_LONG_FILLER)}"
        parts.append(line)
        length += len(line) + 1
    return "\n".join(parts)


def _support_answer(
    rng: random.Random, topic: _Topic, good_answer: str, slots: Mapping[str, str]
) -> tuple[str, str]:
    """(answer, quality) for one support turn."""
    quality = _weighted(rng, SUPPORT_QUALITY_WEIGHTS.items())
    if quality == "curt":
        return rng.choice(topic.curt), quality
    if quality == "wrong":
        return rng.choice(topic.wrong).format(**slots), quality
    if quality == "off_topic":
        return rng.choice(_OFF_TOPIC), quality
    if rng.random() < LONG_RESPONSE_RATE:
        return _long_answer(rng, good_answer), quality
    return good_answer, quality


def _user_turns(rng: random.Random, first: _Question) -> list[tuple[str, str, tuple[str, ...]]]:
    """(user text, good answer, pii kinds) for each user turn of one support conversation."""
    turns = [(first.text, first.good_answer, first.pii)]
    if rng.random() >= MULTI_TURN_RATE:
        return turns
    for text, answer in rng.sample(first.topic.followups, k=rng.randint(1, 2)):
        filled, pii = text.format(**first.slots), []
        if rng.random() < PII_RATE:
            filled, pii = _add_pii(rng, filled)
        turns.append((filled, answer.format(**first.slots), tuple(pii)))
    return turns


def _support_history(rng: random.Random, topic: _Topic, reply: str, order: str) -> list[dict[str, str]]:
    """The assistant side of a past turn; shipping answers sometimes went through an order lookup."""
    if topic.name != "shipping" or rng.random() < 0.5:
        return [{"role": "assistant", "content": reply}]
    status = json.dumps({"order": order, "status": "shipped", "carrier": "DHL"}, separators=(",", ":"))
    return [
        {"role": "assistant", "content": f"Let me look up order {order}."},
        {"role": "tool", "content": status},
        {"role": "assistant", "content": reply},
    ]


def _support_conversation(state: _State) -> None:
    rng = state.rng
    first = _support_question(state)
    turns = _user_turns(rng, first)
    ctx = _new_context(state, "support", multi_turn=len(turns) > 1)
    history: list[dict[str, str]] = [{"role": "system", "content": SUPPORT_SYSTEM_PROMPT}]
    pii_so_far: list[str] = []
    turn_offset = 0
    for index, (text, good_answer, pii) in enumerate(turns):
        if index:
            turn_offset += rng.randint(*TURN_GAP_SECONDS)
        history.append({"role": "user", "content": text})
        pii_so_far.extend(kind for kind in pii if kind not in pii_so_far)
        reply, quality = _support_answer(rng, first.topic, good_answer, first.slots)
        metadata = {
            "client": ctx.client,
            "latency_ms": rng.randint(400, 3_000) + len(reply) // 4,
            "topic": first.topic.name,
            "quality": quality,
            "pii": list(pii_so_far),
        }
        feedback = _feedback(rng, "support", good=quality == "good")
        _add_draft(
            state,
            ctx,
            turn_offset,
            track="support",
            messages=copy.deepcopy(history),
            response=reply,
            feedback=feedback,
            metadata=metadata,
        )
        history.extend(_support_history(rng, first.topic, reply, first.slots["order"]))


# ---------------------------------------------------------------- math track


def _bare_add(rng: random.Random) -> _Problem:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    text = rng.choice(("What is {a} + {b}?", "{a} + {b} = ?", "Compute {a} + {b}.", "what's {a}+{b}"))
    return _Problem(text.format(a=a, b=b), f"{a} + {b}", a + b)


def _bare_sub(rng: random.Random) -> _Problem:
    a, b = sorted((rng.randint(2, 199), rng.randint(2, 199)), reverse=True)
    text = rng.choice(("What is {a} - {b}?", "{a} - {b}", "Calculate {a} - {b}."))
    return _Problem(text.format(a=a, b=b), f"{a} - {b}", a - b)


def _bare_mul(rng: random.Random) -> _Problem:
    a, b = rng.randint(2, 25), rng.randint(2, 12)
    text = rng.choice(("What is {a} * {b}?", "What is {a} × {b}?", "{a}*{b}=?"))
    return _Problem(text.format(a=a, b=b), f"{a} * {b}", a * b)


def _bare_div(rng: random.Random) -> _Problem:
    b, quotient = rng.randint(2, 12), rng.randint(2, 20)
    a = b * quotient
    text = rng.choice(("What is {a} / {b}?", "{a} ÷ {b} = ?"))
    return _Problem(text.format(a=a, b=b), f"{a} / {b}", quotient)


def _bare_compound(rng: random.Random) -> _Problem:
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    if rng.random() < 0.5:
        return _Problem(f"Compute ({a} + {b}) × {c}.", f"({a} + {b}) * {c}", (a + b) * c)
    c = rng.randint(1, a * b)
    return _Problem(f"What is {a} * {b} - {c}?", f"{a} * {b} - {c}", a * b - c)


def _word_eggs(rng: random.Random) -> _Problem:
    rows, cols, boxes = rng.randint(2, 6), rng.randint(2, 6), rng.randint(2, 9)
    text = f"A box holds {rows} rows of {cols} eggs. How many eggs are in {boxes} boxes?"
    return _Problem(text, f"{rows} * {cols} * {boxes}", rows * cols * boxes)


def _word_apples(rng: random.Random) -> _Problem:
    name, have = rng.choice(_WORD_PROBLEM_NAMES), rng.randint(5, 60)
    give = rng.randint(1, have)
    text = f"{name} has {have} apples and gives {give} to a friend. How many apples are left?"
    return _Problem(text, f"{have} - {give}", have - give)


def _word_pens(rng: random.Random) -> _Problem:
    price, count = rng.randint(2, 9), rng.randint(3, 24)
    text = f"Pens cost {price} dollars each. How much do {count} pens cost?"
    return _Problem(text, f"{price} * {count}", price * count)


def _word_teams(rng: random.Random) -> _Problem:
    teams, size = rng.randint(2, 8), rng.randint(3, 9)
    text = (
        f"{teams * size} students are split equally into {teams} teams. How many students are in each team?"
    )
    return _Problem(text, f"{teams * size} / {teams}", size)


def _word_train(rng: random.Random) -> _Problem:
    speed, hours = rng.choice((40, 60, 75, 80, 90, 120)), rng.randint(2, 6)
    text = f"A train travels at {speed} km per hour for {hours} hours. How far does it go, in km?"
    return _Problem(text, f"{speed} * {hours}", speed * hours)


def _word_pages(rng: random.Random) -> _Problem:
    name, per_day, days, extra = (
        rng.choice(_WORD_PROBLEM_NAMES),
        rng.randint(5, 30),
        rng.randint(2, 7),
        rng.randint(1, 40),
    )
    text = f"{name} reads {per_day} pages a day for {days} days, then {extra} more pages. How many pages in total?"
    return _Problem(text, f"{per_day} * {days} + {extra}", per_day * days + extra)


def _word_bus(rng: random.Random) -> _Problem:
    aboard = rng.randint(10, 50)
    off, on = rng.randint(1, aboard), rng.randint(0, 20)
    text = f"A bus has {aboard} passengers. At a stop {off} get off and {on} get on. How many are on the bus now?"
    return _Problem(text, f"{aboard} - {off} + {on}", aboard - off + on)


_MATH_MAKERS: tuple[Callable[[random.Random], _Problem], ...] = (
    _bare_add,
    _bare_sub,
    _bare_mul,
    _bare_div,
    _bare_compound,
    _word_eggs,
    _word_apples,
    _word_pens,
    _word_teams,
    _word_train,
    _word_pages,
    _word_bus,
)


def _math_problem(state: _State) -> _Problem:
    rng = state.rng
    if state.math_seen and rng.random() < DUPLICATE_RATE:
        seen = rng.choice(state.math_seen)
        return _Problem(_retype(rng, seen.text, keep_case=False), seen.expression, seen.answer)
    problem = _Problem(*state.math_maker(rng)) if state.math_maker else rng.choice(_MATH_MAKERS)(rng)
    state.math_seen.append(problem)
    return problem


def _wrong_answer(rng: random.Random, answer: int) -> int:
    delta = rng.choice((-10, -2, -1, 1, 2, 10))
    return answer + delta if answer + delta >= 0 else answer + abs(delta)


def _math_response(rng: random.Random, problem: _Problem, claimed: int) -> str:
    """An answer whose last integer is the claimed result."""
    shown = problem.expression.replace("*", "×")
    template = rng.choice(
        (
            "{expr} = {x}",
            "The answer is {x}.",
            "Let's work it out: {expr} = {x}. So the answer is {x}.",
            "{x}",
        )
    )
    return template.format(expr=shown, x=claimed)


def _math_conversation(state: _State) -> None:
    rng = state.rng
    problem = _math_problem(state)
    ctx = _new_context(state, "math", multi_turn=False)
    messages = [{"role": "user", "content": problem.text}]
    if rng.random() < state.math_system_prompt_rate:
        messages.insert(0, {"role": "system", "content": MATH_SYSTEM_PROMPT})
    correct = rng.random() >= state.math_error_rate
    claimed = problem.answer if correct else _wrong_answer(rng, problem.answer)
    metadata = {
        "client": ctx.client,
        "latency_ms": rng.randint(200, 1_500),
        "answer": problem.answer,
        "expression": problem.expression,
    }
    feedback = _feedback(rng, "math", good=correct)
    _add_draft(
        state,
        ctx,
        0,
        track="math",
        messages=messages,
        response=_math_response(rng, problem, claimed),
        feedback=feedback,
        metadata=metadata,
    )


# ---------------------------------------------------------------- public API

_CONVERSATION_MAKERS: Mapping[str, Callable[[_State], None]] = {
    "support": _support_conversation,
    "math": _math_conversation,
}


def _check_arguments(
    n: int, tracks: Sequence[str], start: datetime, span_hours: float, id_fraction: float
) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = [track for track in tracks if track not in _CONVERSATION_MAKERS]
    if not tracks or unknown:
        raise ValueError(f"tracks must be a non-empty subset of {TRACKS}, got {tuple(tracks)}")
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    if span_hours <= 0:
        raise ValueError(f"span_hours must be > 0, got {span_hours}")
    if not 0.0 <= id_fraction <= 1.0:
        raise ValueError(f"id_fraction must be in [0, 1], got {id_fraction}")


def _record_id(seed: int, position: int, id_fraction: float) -> str | None:
    """Client idempotency key for the record at `position`, independent of the content generator."""
    digest = _digest(seed, "record", position)
    return f"req_{digest[8:32]}" if int(digest[:8], 16) / 2**32 < id_fraction else None


def _to_record(draft: _Draft, start: datetime, record_id: str | None) -> dict[str, Any]:
    """The public JSON object, keys in a fixed order, optional keys left out when unset."""
    record: dict[str, Any] = {} if record_id is None else {"id": record_id}
    record["ts"] = (start + timedelta(seconds=draft.offset)).isoformat(timespec="seconds")
    record["track"] = draft.track
    record["user_id"] = draft.user_id
    if draft.session_id is not None:
        record["session_id"] = draft.session_id
    record["messages"] = draft.messages
    record["response"] = draft.response
    record["model"] = draft.model
    if draft.feedback is not None:
        record["feedback"] = draft.feedback
    record["metadata"] = draft.metadata
    if draft.consent is not None:
        record["consent"] = draft.consent
    return record


def generate_records(
    n: int,
    *,
    seed: int = 0,
    tracks: Sequence[str] = TRACKS,
    start: datetime | None = None,
    span_hours: float = 24.0,
    id_fraction: float = 0.8,
    math_error_rate: float = MATH_ERROR_RATE,
    math_problems: Callable[[random.Random], tuple[str, str, int]] | None = None,
    math_system_prompt_rate: float = MATH_SYSTEM_PROMPT_RATE,
) -> Iterator[dict[str, Any]]:
    """Yield `n` valid interaction records in timestamp order, all within `[start, start + span_hours)`.

    `math_problems(rng) -> (question, expression, answer)` replaces the built-in mix of math
    questions (the demo asks what its base model was taught). The output depends only on the arguments. `id_fraction` is the share of records carrying a client
    `id` (the rest rely on content hashing); it does not change any other field. Multi-turn support
    sessions are logged one record per turn, so a session may be cut short when `n` is reached.
    """
    start = DEFAULT_START if start is None else start
    _check_arguments(n, tracks, start, span_hours, id_fraction)
    state = _State(
        rng=random.Random(seed),
        seed=seed,
        span_seconds=max(1, int(span_hours * 3600)),
        math_error_rate=math_error_rate,
        users=_user_pool(),
        math_maker=math_problems,
        math_system_prompt_rate=math_system_prompt_rate,
    )
    while len(state.drafts) < n:
        _CONVERSATION_MAKERS[state.rng.choice(tracks)](state)
    drafts = sorted(state.drafts[:n], key=lambda draft: (draft.offset, draft.seq))
    for position, draft in enumerate(drafts):
        yield _to_record(draft, start, _record_id(seed, position, id_fraction))


def dumps_record(record: Mapping[str, Any]) -> str:
    """One JSONL line (without the newline): compact, UTF-8 kept as is."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _malformed_base(seed: int) -> dict[str, Any]:
    digest = _digest(seed, "malformed")
    return {
        "id": f"req_bad_{digest[:16]}",
        "ts": (DEFAULT_START + timedelta(minutes=seed % 1440)).isoformat(timespec="seconds"),
        "track": "support",
        "user_id": f"u_{digest[16:26]}",
        "messages": [
            {"role": "system", "content": "You are the support assistant for Nimbus Notes."},
            {"role": "user", "content": "How do I delete my account?"},
        ],
        "response": "Go to Settings > Account > Delete account.",
        "model": "support@v3",
        "feedback": {"thumb": 1, "rating": 5},
        "metadata": {"client": "web"},
        "consent": True,
    }


def _with(base: Mapping[str, Any], mutate: Callable[[dict[str, Any]], None]) -> str:
    record = copy.deepcopy(dict(base))
    mutate(record)
    return dumps_record(record)


def malformed_lines(seed: int = 0) -> list[tuple[str, str]]:
    """(raw JSONL line, reason keyword) pairs, each a line an ingest validator must reject.

    Every line but the first two is a valid record with exactly one defect. The keyword is a lowercase
    hint that the validator's reason should contain; the seed only varies ids, user and timestamp.
    """
    base = _malformed_base(seed)
    return [
        (dumps_record(base)[:-25], "json"),
        (json.dumps([base["track"], base["response"]], ensure_ascii=False), "object"),
        (_with(base, lambda r: r.pop("track")), "track"),
        (_with(base, lambda r: r.update(consent="yes")), "consent"),
        (_with(base, lambda r: r["messages"][1].update(role="wizard")), "role"),
        (_with(base, lambda r: r.update(ts="yesterday")), "ts"),
        (_with(base, lambda r: r.update(ts=r["ts"].removesuffix("+00:00"))), "ts"),
        (_with(base, lambda r: r["feedback"].update(rating=7)), "rating"),
        (_with(base, lambda r: r["feedback"].update(thumb=0)), "thumb"),
        (_with(base, lambda r: r.update(messages=[])), "messages"),
        (_with(base, lambda r: r.update(messages="How do I delete my account?")), "messages"),
        (_with(base, lambda r: r.update(tokens=57)), "unknown"),
        (_with(base, lambda r: r.update(response=["Go to Settings."])), "response"),
    ]


def write_jsonl(
    path: str | os.PathLike[str],
    records: Iterable[Mapping[str, Any]],
    malformed_every: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write records one per line; with `malformed_every=N`, a malformed line follows every N-th record.

    Malformed lines cycle through `malformed_lines(seed)`. Returns `{"records": n, "malformed": m}`.
    """
    if malformed_every is not None and malformed_every < 1:
        raise ValueError(f"malformed_every must be >= 1, got {malformed_every}")
    bad = [line for line, _ in malformed_lines(seed)]
    counts = {"records": 0, "malformed": 0}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8", newline="\n") as out:
        for record in records:
            out.write(dumps_record(record) + "\n")
            counts["records"] += 1
            if malformed_every is not None and counts["records"] % malformed_every == 0:
                out.write(bad[counts["malformed"] % len(bad)] + "\n")
                counts["malformed"] += 1
    return counts
