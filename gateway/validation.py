"""Checks of what a client sends. Each check of a request collects every violation and raises
one INVALID_ARGUMENT naming each field, so a form can mark all its mistakes at once (at most
MAX_VIOLATIONS of them: cardcheck.runtime.errors bounds every refusal). A repeated field's size
is checked before any of its values, so a request's cost does not grow with its junk: grpc
refuses a SubmitQuery over 32 KiB before it is parsed (gateway/app.py), and below that at most
MAX_BANK_CODES values are ever looked at."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta, timezone

from cardcheck.banks import BY_CODE, MAX_BANK_CODES
from cardcheck.numbers import card_number_valid, id_number_valid
from cardcheck.runtime.errors import CardCheckError, FieldViolation, Reason, invalid_argument
from cardcheck.runtime.settings import ALL_REGIONS

CHINA_TZ = timezone(timedelta(hours=8))  # birth dates on an ID are calendar days in China

# Every pattern is matched whole (fullmatch: `$` would let a trailing newline through) and
# digits are ASCII digits ([0-9]: `\d` and str.isdigit also take e.g. Arabic-Indic digits,
# which would make a second spelling of the same ID number or phone).
_NAME = re.compile(
    r"[\u3400-\u4dbf\u4e00-\u9fffA-Za-z]"  # starts with a Chinese character or a letter
    r"(?:[\u3400-\u4dbf\u4e00-\u9fffA-Za-z]|[·• ](?=[\u3400-\u4dbf\u4e00-\u9fffA-Za-z]))*"
)
_PHONE = re.compile(r"1[3-9][0-9]{9}")
_SIX_DIGITS = re.compile(r"[0-9]{6}")
_ID_NUMBER = re.compile(r"[0-9]{17}[0-9Xx]")
_CARD_NUMBER = re.compile(r"[0-9]{16,19}")
_CHALLENGE_ID = re.compile(r"[0-9a-f]{32}")
_QUERY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_BANK_CODE = re.compile(r"[A-Za-z0-9_-]{1,32}")
SMS_PURPOSES = ("REGISTER", "SIGN_IN", "QUERY_AUTH")
MAX_FACE_TOKEN = 4096


def valid_idempotency_key(value: str) -> bool:
    return _IDEMPOTENCY_KEY.fullmatch(value) is not None


def today_in_china(now: datetime) -> date:
    return now.astimezone(CHINA_TZ).date()


class Violations:
    """Collects the violations of one request."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_argument(self.items)

    # Each check adds at most one violation, naming its field.

    def name(self, value: str, field: str = "name") -> None:
        if not value:
            self.add(field, "required")
        elif len(value) > 30 or not _NAME.fullmatch(value):
            self.add(field, "1-30 Chinese characters or letters, '·' between parts")

    def id_number(self, value: str, today: date, field: str = "id_number") -> None:
        if not value:
            self.add(field, "required")
        elif not _ID_NUMBER.fullmatch(value) or not id_number_valid(value, today):
            self.add(field, "not a valid 18-character resident ID number")

    def phone(self, value: str, field: str = "phone") -> None:
        if not value:
            self.add(field, "required")
        elif not _PHONE.fullmatch(value):
            self.add(field, "not a mainland mobile number (11 digits starting 13-19)")

    def card_number(self, value: str, field: str = "card_number") -> None:
        if not value:
            self.add(field, "required")
        elif not _CARD_NUMBER.fullmatch(value) or not card_number_valid(value):
            self.add(field, "not a valid card number (16-19 digits, Luhn)")

    def payment_password(self, value: str, field: str = "payment_password") -> None:
        if not value:
            self.add(field, "required")
        elif not _SIX_DIGITS.fullmatch(value):
            self.add(field, "must be exactly 6 digits")

    def region(self, value: str, field: str = "region") -> None:
        if not value:
            self.add(field, "required")
        elif value not in ALL_REGIONS:
            self.add(field, "not an ISO 3166-2:CN provincial region code, e.g. CN-JL")

    def challenge(self, challenge_id: str, sms_code: str) -> None:
        if not challenge_id:
            self.add("challenge_id", "required")
        elif not _CHALLENGE_ID.fullmatch(challenge_id):
            self.add("challenge_id", "not a challenge id from RequestSmsCode")
        if not sms_code:
            self.add("sms_code", "required")
        elif not _SIX_DIGITS.fullmatch(sms_code):
            self.add("sms_code", "must be exactly 6 digits")

    def sms_purpose(self, value: str | None, field: str = "purpose") -> None:
        if value not in SMS_PURPOSES:
            self.add(field, "one of REGISTER, SIGN_IN, QUERY_AUTH")

    def query_id(self, value: str, field: str = "query_id") -> None:
        if not value:
            self.add(field, "required")
        elif not _QUERY_ID.fullmatch(value):
            self.add(field, "not a query id")

    def idempotency_key(self, value: str, field: str = "idempotency_key") -> None:
        if value and not valid_idempotency_key(value):
            self.add(field, "1-128 printable ASCII characters without spaces")

    def face_token(self, value: str, field: str = "face_token") -> None:
        if not value:
            self.add(field, "required")
        elif len(value) > MAX_FACE_TOKEN:
            self.add(field, "too long")

    def agreement_version(self, value: str, field: str = "agreement_version") -> None:
        if len(value) > 64:
            self.add(field, "too long")

    def bank_codes(self, values: Sequence[str], field: str = "bank_codes") -> None:
        if len(values) > MAX_BANK_CODES:
            self.add(field, f"too many bank codes ({len(values)}; at most {MAX_BANK_CODES})")
            return  # none of them is looked at
        for i, code in enumerate(values):
            if not code:
                self.add(f"{field}[{i}]", "empty bank code")
            elif not _BANK_CODE.fullmatch(code):
                self.add(f"{field}[{i}]", "not a bank code (1-32 letters, digits, '_' or '-')")


def known_banks(codes: Sequence[str], field: str = "bank_codes") -> list[str]:
    """The bank codes in the order given, duplicates dropped; UNKNOWN_BANK names the first
    unknown one (all of them in `bank_codes`, and each one's field in a BadRequest)."""
    unknown = [(i, code) for i, code in enumerate(codes) if code not in BY_CODE]
    if unknown:
        names = list(dict.fromkeys(code for _, code in unknown))
        raise CardCheckError(
            Reason.UNKNOWN_BANK,
            f"unknown bank code {names[0]!r}",
            metadata={"bank_code": names[0], "bank_codes": ",".join(names)},
            violations=[FieldViolation(f"{field}[{i}]", "unknown bank code") for i, _ in unknown],
        )
    return list(dict.fromkeys(codes))


def check_region_enabled(region: str, enabled_regions: Iterable[str]) -> None:
    if region not in enabled_regions:
        raise CardCheckError(
            Reason.REGION_NOT_SUPPORTED, f"region {region} is not enabled", metadata={"region": region}
        )


def normalise_id_number(value: str) -> str:
    return value.upper()
