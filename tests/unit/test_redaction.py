"""Tests for pipeline.harvest.redaction: what is redacted, what must survive, counts, idempotence."""

from __future__ import annotations

import copy
import time
from collections import Counter

import pytest

from pipeline.harvest.redaction import PII_TYPES, redact, redact_record_texts

# (text, expected redacted text); each text holds PII of its list's type only.
EMAIL_CASES = [
    ("Mail me at john.doe@example.com tomorrow.", "Mail me at [EMAIL] tomorrow."),
    ("Reply to jane_smith+news@mail.example.co.uk.", "Reply to [EMAIL]."),
    ("<a href='mailto:ops-team@corp.io'>ops</a>", "<a href='mailto:[EMAIL]'>ops</a>"),
    ("My address is 4155552671@vtext.com, not a phone.", "My address is [EMAIL], not a phone."),
    ("連絡先はtaro.yamada@example.jpです", "連絡先は[EMAIL]です"),
]
PHONE_CASES = [
    ("Call me on +1 (415) 555-2671 after six.", "Call me on [PHONE] after six."),
    ("Office: +44 20 7946 0958.", "Office: [PHONE]."),
    ("UK style +44 (0)20 7946 0958 works too", "UK style [PHONE] works too"),
    ("Whatsapp +4915112345678 please", "Whatsapp [PHONE] please"),
    ("Paris +33 1 23 45 67 89", "Paris [PHONE]"),
    ("US number (415) 555-2671 or", "US number [PHONE] or"),
    ("US number 415-555-2671 or", "US number [PHONE] or"),
    ("US number 415.555.2671 or", "US number [PHONE] or"),
    ("Toll free 1-800-555-0199.", "Toll free 1-[PHONE]."),
    ("Handy 0151 12345678 ab 18 Uhr", "Handy [PHONE] ab 18 Uhr"),
    ("Büro 030/1234567, Fax (030) 1234 5678", "Büro [PHONE], Fax [PHONE]"),
    ("Mon portable: 06 12 34 56 78", "Mon portable: [PHONE]"),
    ("電話は03-1234-5678です", "電話は[PHONE]です"),
    ("Termin: +1 (415) 555-2671 2026-11-22 passt", "Termin: [PHONE] 2026-11-22 passt"),
]
CARD_CASES = [
    ("Card number 4111 1111 1111 1111 exp 12/27", "Card number [CARD] exp 12/27"),
    ("use 4111-1111-1111-1111 for the test", "use [CARD] for the test"),
    ("Mastercard 5555555555554444.", "Mastercard [CARD]."),
    ("Amex 378282246310005 and", "Amex [CARD] and"),
    ("Amex grouped 3782 822463 10005 and", "Amex grouped [CARD] and"),
    ("Discover: 6011 0009 9013 9424", "Discover: [CARD]"),
    (
        "card 4111 1111 1111 1111 123 (the last group is the CVV)",
        "card [CARD] 123 (the last group is the CVV)",
    ),
]
IBAN_CASES = [
    ("Please wire it to DE89 3704 0044 0532 0130 00 by Friday.", "Please wire it to [IBAN] by Friday."),
    ("IBAN: GB82WEST12345698765432", "IBAN: [IBAN]"),
    ("NL91 ABNA 0417 1643 00, thanks", "[IBAN], thanks"),
    ("Konto BE68 5390 0754 7034 EUR", "Konto [IBAN] EUR"),
    ("FR14 2004 1010 0505 0001 3M02 606 is mine", "[IBAN] is mine"),
    # In use but outside SWIFT's registry (so `stdnum.iban.is_valid` refuses them): still personal data.
    ("Shaba IR06 2960 0000 0010 0324 2000 01 please", "Shaba [IBAN] please"),
    ("compte CI93CI0080111301134291200589.", "compte [IBAN]."),
]
IP_CASES = [
    ("ssh into 192.168.1.10 now", "ssh into [IP] now"),
    ("server at 8.8.8.8:53.", "server at [IP]:53."),
    ("blocked 203.0.113.255/32", "blocked [IP]/32"),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 full", "v6 [IP] full"),
    ("compressed 2001:db8::ff00:42:8329 form", "compressed [IP] form"),
    ("url http://[2001:db8::1]:8080/", "url http://[[IP]]:8080/"),
    ("mapped ::ffff:192.0.2.128 here", "mapped [IP] here"),
]
SECRET_CASES = [
    ("my key is sk-abcdefghijklmnopqrstuvwxyz123456", "my key is [SECRET]"),
    ("export OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "export OPENAI_API_KEY=[SECRET]"),
    ("token ghp_1234567890abcdefghijABCDEFGHIJ123456 leaked", "token [SECRET] leaked"),
    ("pat github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "pat [SECRET]"),
    ("aws AKIAIOSFODNN7EXAMPLE in config", "aws [SECRET] in config"),
    ("slack xoxb-123456789012-abcdefghijkl", "slack [SECRET]"),
    (
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok",
        "jwt [SECRET] ok",
    ),
    ("Authorization: Bearer abc123def456ghi789jkl0.", "Authorization: Bearer [SECRET]."),
    ("password: hunter2", "password: [SECRET]"),
    ('{"api_key": "abc123xyz789", "user": "bob"}', '{"api_key": "[SECRET]", "user": "bob"}'),
    ("GET /v1/items?access_token=ya29.a0AfH6SMB&page=2", "GET /v1/items?access_token=[SECRET]&page=2"),
    ("settings.client_secret = 'Zx8-Qw7-Er6-Ty5'", "settings.client_secret = '[SECRET]'"),
]

TYPED_CASES = [
    pytest.param(text, expected, kind, id=f"{kind}-{i}")
    for kind, cases in (
        ("EMAIL", EMAIL_CASES),
        ("PHONE", PHONE_CASES),
        ("CARD", CARD_CASES),
        ("IBAN", IBAN_CASES),
        ("IP", IP_CASES),
        ("SECRET", SECRET_CASES),
    )
    for i, (text, expected) in enumerate(cases)
]


@pytest.mark.parametrize(("text", "expected", "kind"), TYPED_CASES)
def test_each_type_is_redacted_with_its_placeholder(text: str, expected: str, kind: str) -> None:
    redacted, counts = redact(text)
    assert redacted == expected
    assert counts == Counter({kind: expected.count(f"[{kind}]")})


def test_two_secrets_in_a_command_line_keep_their_keys() -> None:
    redacted, counts = redact("curl -H 'x-api-key: 9f8e7d6c5b4a' --password=S3cr3t!pass")
    assert redacted == "curl -H 'x-api-key: [SECRET]' --password=[SECRET]"
    assert counts == Counter({"SECRET": 2})


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 failed",
        "card 4111-1111-1111-1121",
        "number 5555555555554445",
        "Amex 378282246310006",
        "ref 4242424242424241",
        "card 3782 822463 10006 (Amex layout)",
    ],
)
def test_card_numbers_failing_luhn_are_not_redacted_as_cards(text: str) -> None:
    redacted, counts = redact(text)
    assert "[CARD]" not in redacted
    assert counts["CARD"] == 0
    assert redacted == text


@pytest.mark.parametrize(
    "text",
    [
        "IBAN DE89 3704 0044 0532 0130 01 (typo)",
        "GB82WEST12345698765433",
        "NL91 ABNA 0417 1643 01",
        "ticket AB12 CDEF GHIJ KLMN 12",
    ],
)
def test_ibans_failing_mod97_are_not_redacted(text: str) -> None:
    assert redact(text) == (text, Counter())


@pytest.mark.parametrize(
    "text",
    [
        "ping 999.1.1.1 fails",
        "256.256.256.256 is out of range",
        "host 192.168.1.300",
        "octal-looking 010.001.002.003 is rejected",
        "not v6: 12:30:45 or 00:1a:2b:3c:4d:5e",
    ],
)
def test_invalid_ip_addresses_are_not_redacted(text: str) -> None:
    assert redact(text) == (text, Counter())


FALSE_POSITIVE_GUARDS = [
    "What is 12 + 30 = 42? And 1+2+3=6.",
    "The meeting is on 2026-11-22 at 12:30, or 22.11.2026 / 11/22/2026.",
    "Logs from 01.02.2026 12:30 and 2026-11-22T12:30:45Z.",
    "Am 01.02.2026 10 Uhr, am 03.04.2026 11 Uhr.",
    "Upgrade from v1.2.3 to 1.10.0-rc1; Windows build 10.0.19045.3693.",
    "Your order 123456 ships today; order #987654 was refunded.",
    "It costs $1,234.56 or 1 234 567 EUR, about 999.99 per month.",
    "The token is sent in the header; a Bearer token authenticates the client.",
    "Each token costs money. Token: expires soon. Password: required. secret: none",
    "api_key=YOUR_API_KEY and token=os.environ and password=******** and pwd=changeme",
    "The cafe had a dead beef and a bad fad; facade, decade, accede.",
    "In C++ use std::vector, in Haskell f :: Int -> Int, in Python x[1::2] and a[::3].",
    "Epoch 1732233600 and 1732233600000 ms; pi is 3.14159265358979323846.",
    "Ratio 1:2:3, John 3:16, at 12:30:45 and 09:05.",
    "sk-learn is not a key, and neither is ghp_ or AKIA alone.",
    "max_tokens=4096, num_tokens: 512, token_count = 1000000",
    "Scores 12 34 56 and 7, room 101, year 1999, PIN 1234.",
]


@pytest.mark.parametrize("text", FALSE_POSITIVE_GUARDS)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == (text, Counter())


@pytest.mark.parametrize(
    "text",
    [
        "Привет! Как дела? Всё хорошо, спасибо.",
        "東京は今日も晴れです。明日は雨かもしれません。",
        "Ça va très bien — naïve café, Straße, ÆØÅ, 😀🚀",
        "مرحبا بك في المنتدى",
        "Arabic-Indic digits ١٢٣٤٥٦٧٨٩٠١٢ and full-width ４１１１１１１１１１１１１１１１",
    ],
)
def test_unicode_text_is_untouched(text: str) -> None:
    assert redact(text) == (text, Counter())


def test_unicode_around_pii_is_preserved() -> None:
    text = "Grüße an José: jose@example.com — Tel. +49 30 1234567 ✓ 東京"
    redacted, counts = redact(text)
    assert redacted == "Grüße an José: [EMAIL] — Tel. [PHONE] ✓ 東京"
    assert counts == Counter({"EMAIL": 1, "PHONE": 1})


def test_multiple_pii_in_one_text_are_all_redacted_and_counted() -> None:
    text = (
        "Hi, I'm Ann (ann.lee@example.org, +1 415 555 2671). Pay DE89 3704 0044 0532 0130 00 "
        "or card 4111 1111 1111 1111; my server is 10.0.0.7 and my key is sk-abcdefghijklmnopqrstuv0123. "
        "Backup mail: ann@lee.dev"
    )
    redacted, counts = redact(text)
    assert redacted == (
        "Hi, I'm Ann ([EMAIL], [PHONE]). Pay [IBAN] or card [CARD]; my server is [IP] and my key is [SECRET]. "
        "Backup mail: [EMAIL]"
    )
    assert counts == Counter({"EMAIL": 2, "PHONE": 1, "IBAN": 1, "CARD": 1, "IP": 1, "SECRET": 1})
    assert set(counts) <= set(PII_TYPES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail 0151.12345678@example.com", "mail [EMAIL]"),
        ("sms gateway +14155552671@sms.example.com", "sms gateway [EMAIL]"),
        ("odd but valid 4111111111111111@example.com", "odd but valid [EMAIL]"),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        (
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlMTIz",
            "Authorization: Bearer [SECRET]",
        ),
        ("api_key: sk-abcdefghijklmnopqrstuv0123", "api_key: [SECRET]"),
    ],
)
def test_overlaps_resolve_to_one_placeholder(text: str, expected: str) -> None:
    redacted, counts = redact(text)
    assert redacted == expected
    assert sum(counts.values()) == 1


def test_scan_resumes_after_a_redacted_prefix() -> None:
    # The phone candidate runs on into "10.0.0.7" (16 digits); its valid prefix is redacted and the
    # text after it is scanned again, so the IP address is still found.
    redacted, counts = redact("ruf +1 (415) 555-2671 10.0.0.7 an")
    assert redacted == "ruf [PHONE] [IP] an"
    assert counts == Counter({"PHONE": 1, "IP": 1})


def test_empty_text() -> None:
    assert redact("") == ("", Counter())


ALL_TEXTS = [text for case in TYPED_CASES for text in case.values[:1]] + FALSE_POSITIVE_GUARDS


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_redaction_is_idempotent(text: str) -> None:
    once, _ = redact(text)
    twice, counts = redact(once)
    assert twice == once
    assert counts == Counter()


@pytest.mark.parametrize(
    "text",
    [
        "-" * 20_000,
        "a." * 10_000,
        "_" * 20_000,
        "1:" * 10_000 + "x",
        "a:b:" * 5_000 + "g",
        "eyJaaaaaaaaa-" * 8_000,
        "+1 " * 7_000,
        "01 " * 7_000,
        "DE89 " * 4_000,
        "(0" * 10_000,
    ],
)
def test_long_adversarial_inputs_stay_linear(text: str) -> None:
    start = time.perf_counter()
    redact(text)
    assert time.perf_counter() - start < 1.0


def test_redact_record_texts_redacts_every_text_without_mutating_inputs() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "I'm at bob@example.com or +44 20 7946 0958", "name": "bob"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "ip 10.1.2.3"}, {"type": "image_url", "url": "x"}],
        },
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    response = "Sure, I'll email bob@example.com."
    original = copy.deepcopy(messages)

    new_messages, new_response, counts = redact_record_texts(messages, response)

    assert messages == original
    assert new_messages == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "I'm at [EMAIL] or [PHONE]", "name": "bob"},
        {"role": "user", "content": [{"type": "text", "text": "ip [IP]"}, {"type": "image_url", "url": "x"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    assert new_response == "Sure, I'll email [EMAIL]."
    assert counts == Counter({"EMAIL": 2, "PHONE": 1, "IP": 1})
    assert all(new is not old for new, old in zip(new_messages, messages, strict=True))
    assert new_messages[2]["content"] is not messages[2]["content"]


def test_redact_record_texts_with_nothing_to_redact() -> None:
    messages = [{"role": "user", "content": "hello"}]
    new_messages, new_response, counts = redact_record_texts(messages, "hi there")
    assert (new_messages, new_response, counts) == (messages, "hi there", Counter())
    assert new_messages[0] is not messages[0]
