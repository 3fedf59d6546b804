"""The notifier's SMS parameters and template versions on notifier.templates itself, without any
server (tests/test_notifier.py renders the shipped texts): what each kind of SMS needs, and
that the highest version number is the one sent, counted as a number."""

from __future__ import annotations

import pytest

from notifier.templates import TEMPLATE_DIR, load_template_book, param_problems, purpose_key


@pytest.mark.parametrize(
    "kind, params, problems",
    [
        ("SMS_CODE", {"code": "314159", "purpose": "SIGN_IN"}, {}),
        ("SMS_CODE", {"code": "1234", "purpose": "SMS_PURPOSE_QUERY_AUTH"}, {}),
        ("SMS_CODE", {"code": "12345678", "purpose": " register "}, {}),
        (
            "SMS_CODE",
            {"code": "", "purpose": ""},
            {
                "params[code]": "code is required for SMS_CODE",
                "params[purpose]": "purpose is required for SMS_CODE",
            },
        ),
        ("SMS_CODE", {"code": "123", "purpose": "SIGN_IN"}, {"params[code]": "code must be 4 to 8 digits"}),
        ("SMS_CODE", {"code": "123456789", "purpose": "SIGN_IN"}, {"params[code]": "code must be 4 to 8 digits"}),
        (
            "SMS_CODE",
            {"code": "1234", "purpose": "RESET"},
            {"params[purpose]": "purpose must be one of REGISTER, SIGN_IN, QUERY_AUTH"},
        ),
        ("REPORT_READY", {}, {}),
        ("CONSENT_RECEIPT", {"agreement_version": "2026-11.v2_a"}, {}),
        (
            "CONSENT_RECEIPT",
            {"agreement_version": "x" * 33},
            {"params[agreement_version]": "agreement_version must be 1-32 of [0-9A-Za-z._-]"},
        ),
        ("CONSENT_RECEIPT", {}, {"params[agreement_version]": "agreement_version is required for CONSENT_RECEIPT"}),
    ],
)
def test_what_each_kind_of_sms_needs(kind, params, problems):
    assert param_problems(kind, params) == problems


def test_a_purpose_is_named_with_or_without_its_enum_prefix():
    assert purpose_key("SMS_PURPOSE_SIGN_IN") == purpose_key(" sign_in ") == "SIGN_IN"


def test_version_10_is_newer_than_version_9(tmp_path):
    for source in TEMPLATE_DIR.glob("*.txt"):
        (tmp_path / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    for version in (9, 10):
        (tmp_path / f"report_ready.v{version}.txt").write_text(f"v{version}", encoding="utf-8")
    (tmp_path / "report_ready.v3.txt.bak").write_text("not a template", encoding="utf-8")
    book = load_template_book(tmp_path)
    assert book.newest["REPORT_READY"].name == "report_ready.v10"
    assert book.newest["REPORT_READY"].render({}) == "v10"
    assert {"report_ready.v1", "report_ready.v9", "report_ready.v10"} <= set(book.named)
    assert "report_ready.v3" not in book.named
