"""PII redaction for harvested chat interactions.

Why: the nightly update trains on real user traffic, so the training data must not carry users'
personal data or credentials. Every text field of a harvested interaction goes through
:func:`redact` before it is kept for training. Matches are replaced by typed placeholders
(``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``, ``[IP]``, ``[SECRET]``) rather than deleted, so a
sentence keeps its shape: the model still learns that "an address goes here" without learning
anybody's address.

How: one compiled regex, one named group per candidate shape, scanned once per text, left to right.
For each candidate a handler runs the check a regex cannot express (Luhn for cards, ISO 13616 mod-97
for IBANs, octet range for IPv4, a parser for IPv6, digit count for phones, "looks random" for
secret values); a candidate that fails is kept as it is. Overlaps are deterministic: the leftmost
candidate wins and, at one position, the first alternative in ``_PATTERNS`` (secrets, e-mail, IBAN,
card, IP, phone), so an e-mail holding digits is an EMAIL and a card is tried before a phone. When
only a prefix of a candidate is valid (an IBAN followed by "EUR", a phone followed by a date), the
prefix is redacted and the scan goes on right after it. A run that an alternative scans without
bound is tried from its start only and number shapes have bounded repetitions, so the scan stays
linear on long hostile input.

The checksums come from python-stdnum: `stdnum.luhn` for cards, `stdnum.iso7064.mod_97_10` for
IBANs. Not `stdnum.iban.is_valid`: it also requires a country in SWIFT's registry with that
country's exact length and layout, and by default a bank code in its bundled lists, so real IBANs it
does not know (Iran, Senegal, Côte d'Ivoire and Algeria use them outside the registry; a Belgian bank
missing from its list) would leak. The candidate shapes, the IBAN rearrangement and 15-34 length,
the card length (13-19 digits) and the prefix search stay here: they decide what counts as a match
in prose.

Chosen limits, precision first so that prose, maths, dates, times, versions and code survive:
phones need a ``+``, a ``(area)``/3-3-4 layout or a leading trunk ``0`` plus separators, and 9-15
digits (bare digit runs such as timestamps or order ids are left alone; a short number right after a
phone may be taken with it); cards must start with 2-6 (the payment-card issuers); IBANs are upper
case; e-mail local parts are ASCII; IPv6 needs at least three groups (so ``::``, ``fe80::1``,
``a::b`` and slices like ``x[1::2]`` stay) and a four-part version such as ``1.2.3.4`` reads as an
IPv4 address; ``key=value`` secrets need a value that is not a plain identifier
(``api_key=os.environ``, ``YOUR_API_KEY``) unless it is 24+ characters long.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from stdnum import luhn
from stdnum.iso7064 import mod_97_10

__all__ = ["PII_TYPES", "redact", "redact_record_texts"]

PII_TYPES: tuple[str, ...] = ("EMAIL", "PHONE", "CARD", "IBAN", "IP", "SECRET")

# Value characters of a `key=value` secret: brackets are excluded so that a placeholder is never a
# value (redacting twice changes nothing), "&" so that a URL query keeps its other parameters.
_VALUE = r"[^\s\"'`,;&()<>\[\]{}]"
# api_key, access-token, client_secret, secret_key, password, pwd, ... in any case; the lookahead
# and the prefix-shared alternatives keep this cheap at the many words starting with these letters.
_SECRET_KEY = (
    r"(?=[ACPRSTacprst])(?i:a(?:pi[_-]?key|(?:ccess|uth)[_-]?token)|refresh[_-]?token|client[_-]?secret"
    r"|secret(?:[_-]?key)?|token|p(?:assw(?:or)?d|wd))"
)
_NUMBER_END = r"(?![\w:]|[.,-][0-9])"

# (group name, PII type, pattern), in precedence order. Most alternatives start with a plain
# character or class, which lets `re` reject a position with one comparison per alternative; a
# lookbehind sits after that first character: "[2-6](?<!\.[0-9])" (no card right after a "."),
# "[\w%+-](?<![\w.%+-].)" (an e-mail local part, a JWT, an IPv6 run is tried from its start only,
# which keeps long runs such as "-----", "a.b.c..." or "1:2:3:...x" linear instead of quadratic).
# A secret value never ends in "." (`(?<!\.)`): that is the end of the sentence.
_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("jwt", "SECRET", r"eyJ(?<![\w-]eyJ)[\w-]{8,}\.[\w-]{8,}\.[\w-]*"),
    ("openai", "SECRET", r"sk-[\w-]{20,}"),
    ("github", "SECRET", r"g(?:h[pousr]_[A-Za-z0-9]{20,}|ithub_pat_\w{20,})"),
    ("aws", "SECRET", r"A[KS]IA[0-9A-Z]{16}(?![A-Za-z0-9])"),
    ("slack", "SECRET", r"xox[abprs]-[A-Za-z0-9-]{10,}"),
    ("bearer", "SECRET", r"[Bb]earer[ \t]+(?P<bearer_value>[\w.~+/-]{16,}=*)(?<!\.)"),
    ("kv", "SECRET", rf"{_SECRET_KEY}[\"']?[ \t]*[:=][ \t]*[\"']?(?P<kv_value>{_VALUE}{{6,}})(?<!\.)"),
    ("email", "EMAIL", r"[\w%+-](?<![\w.%+-].)[\w.%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ("iban", "IBAN", r"[A-Z][A-Z][0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"),
    (
        "card",
        "CARD",
        r"[2-6](?<!\.[0-9])[0-9]{3}(?:(?P<card_sep>[ -])(?:[0-9]{4}(?P=card_sep)[0-9]{4}(?P=card_sep)"
        r"[0-9]{4}(?:(?P=card_sep)[0-9]{3})?|[0-9]{6}(?P=card_sep)[0-9]{4,5})|[0-9]{9,15})" + _NUMBER_END,
    ),
    ("ipv4", "IP", r"[0-9](?<!\.[0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w]|\.[0-9])"),
    (
        "ipv6",
        "IP",
        r"[0-9A-Fa-f:](?<![:.].)[0-9A-Fa-f]{0,3}:[0-9A-Fa-f]{0,4}:(?:[0-9A-Fa-f:.]*[0-9A-Fa-f:])?(?![\w:]|\.[0-9])",
    ),
    (
        "phone_intl",
        "PHONE",
        r"\+[0-9]{1,3}(?:[ .-]?\([0-9]{1,4}\))?[ .-]?[0-9]{1,12}(?:[ .-][0-9]{1,12}){0,7}" + _NUMBER_END,
    ),
    ("phone_nanp", "PHONE", r"(?:\([0-9]{3}\)[ .-]?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}" + _NUMBER_END),
    (
        "phone_trunk",
        "PHONE",
        r"(?:\(0[0-9]{1,4}\) ?|0[0-9]{1,4}[ ./-])[0-9]{2,8}(?:[ ./-][0-9]{2,8}){0,5}" + _NUMBER_END,
    ),
)

# A match starts only where no ASCII letter or digit precedes it ("_" and "." may, so that
# OPENAI_API_KEY=... and settings.token=... are caught). Each alternative ends in an empty named
# group, which `match.lastgroup` reports (it closes last) without hiding the first character from
# `re`'s fast rejection. re.ASCII: \w and \d are ASCII only, so a number glued to CJK text still
# matches and non-ASCII digits never do.
_PII_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:" + "|".join(f"{pattern}(?P<{name}>)" for name, _, pattern in _PATTERNS) + ")",
    re.ASCII,
)
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z_.-]*")


def _card_ok(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    return 15 <= len(compact) <= 34 and mod_97_10.is_valid(compact[4:] + compact[:4])  # ISO 13616


def _valid_prefix(candidate: str, is_valid: Callable[[str], bool], cuts: str) -> str | None:
    """Longest prefix of `candidate`, cut before one of `cuts`, that passes `is_valid`.

    Trailing groups can belong to the sentence, not the number: "... 7034 EUR" after an IBAN, a CVV
    after a card, a date or a count after a phone number.
    """
    end = len(candidate)
    while end > 0:
        if is_valid(candidate[:end]):
            return candidate[:end]
        end = max(candidate.rfind(cut, 0, end) for cut in cuts)
    return None


def _ipv4_ok(candidate: str) -> bool:
    # Leading zeros are rejected, as Python's ipaddress does (they read as octal in some parsers).
    return all(int(octet) <= 255 and (octet == "0" or octet[0] != "0") for octet in candidate.split("."))


def _ipv6_ok(candidate: str) -> bool:
    groups = [part for part in candidate.split(":") if part]
    if len(groups) < 3 and "." not in candidate:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _phone_ok(candidate: str) -> bool:
    return 9 <= sum(ch.isdigit() for ch in candidate) <= 15


def _trunk_phone_ok(candidate: str) -> bool:
    # One separator style after the area code, so "01.02.2026 12" (date + hour) is not a phone.
    tail = candidate.rpartition(")")[2].lstrip()
    return _phone_ok(candidate) and len({ch for ch in tail if not ch.isdigit()}) <= 1


def _looks_secret(value: str) -> bool:
    """A credential value, not a placeholder (`********`) or code (`os.environ`, `YOUR_API_KEY`)."""
    if len(value) < 6 or len(set(value)) < 3:
        return False
    return len(value) >= 24 or not _IDENTIFIER_RE.fullmatch(value)


# A handler gets a match and returns the span to replace by the placeholder, or None to keep the text.
_Handler = Callable[[re.Match[str]], tuple[int, int] | None]


def _whole(match: re.Match[str]) -> tuple[int, int] | None:
    return match.span()


def _checked(is_valid: Callable[[str], bool]) -> _Handler:
    def handle(match: re.Match[str]) -> tuple[int, int] | None:
        return match.span() if is_valid(match.group()) else None

    return handle


def _prefix_checked(is_valid: Callable[[str], bool], cuts: str = " ") -> _Handler:
    """Redact the longest valid prefix; the scan resumes right after it, so the rest is scanned too."""

    def handle(match: re.Match[str]) -> tuple[int, int] | None:
        prefix = _valid_prefix(match.group(), is_valid, cuts)
        return None if prefix is None else (match.start(), match.start() + len(prefix))

    return handle


def _value_only(value_group: str) -> _Handler:
    """Redact only the value: "Bearer [SECRET]", "api_key=[SECRET]"."""

    def handle(match: re.Match[str]) -> tuple[int, int] | None:
        return match.span(value_group) if _looks_secret(match[value_group]) else None

    return handle


_HANDLERS: dict[str, _Handler] = {
    "bearer": _value_only("bearer_value"),
    "kv": _value_only("kv_value"),
    "iban": _prefix_checked(_iban_ok),
    "card": _prefix_checked(_card_ok, cuts=" -"),
    "ipv4": _checked(_ipv4_ok),
    "ipv6": _checked(_ipv6_ok),
    "phone_intl": _prefix_checked(_phone_ok),
    "phone_nanp": _checked(_phone_ok),
    "phone_trunk": _prefix_checked(_trunk_phone_ok),
}
_RULES: dict[str, tuple[str, _Handler]] = {
    name: (kind, _HANDLERS.get(name, _whole)) for name, kind, _ in _PATTERNS
}


def redact(text: str) -> tuple[str, Counter[str]]:
    """Replace PII in `text` by typed placeholders; return the new text and the count per type.

    One left-to-right scan: a candidate that fails its check is kept and skipped as a whole; after a
    redaction the scan resumes at the end of the redacted span.
    """
    counts: Counter[str] = Counter()
    pieces: list[str] = []
    done = 0
    match = _PII_RE.search(text)
    while match is not None:
        kind, handler = _RULES[match.lastgroup or ""]
        span = handler(match)
        if span is None:
            match = _PII_RE.search(text, match.end())
            continue
        pieces += (text[done : span[0]], f"[{kind}]")
        counts[kind] += 1
        done = span[1]
        match = _PII_RE.search(text, done)
    if not pieces:
        return text, counts
    pieces.append(text[done:])
    return "".join(pieces), counts


def _redact_content(content: Any, counts: Counter[str]) -> Any:
    """Redact a message content: a string, or a list of parts whose `text` fields are strings."""
    if isinstance(content, str):
        redacted, found = redact(content)
        counts.update(found)
        return redacted
    if isinstance(content, list):
        return [_redact_part(part, counts) for part in content]
    return content


def _redact_part(part: Any, counts: Counter[str]) -> Any:
    if not isinstance(part, dict):
        return part
    if isinstance(part.get("text"), str):
        return {**part, "text": _redact_content(part["text"], counts)}
    return dict(part)


def redact_record_texts(
    messages: list[dict[str, Any]], response: str
) -> tuple[list[dict[str, Any]], str, Counter[str]]:
    """Redact every message content and the response; new objects are returned, inputs are untouched."""
    counts: Counter[str] = Counter()
    new_messages = [
        {**message, "content": _redact_content(message["content"], counts)}
        if "content" in message
        else dict(message)
        for message in messages
    ]
    new_response, found = redact(response)
    counts.update(found)
    return new_messages, new_response, counts
