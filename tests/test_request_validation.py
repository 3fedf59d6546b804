"""The checks of what a client sends, on Violations and the number rules themselves, without any
server: an ID number's check digit and a birth date not after today in China, mobile numbers,
card numbers of 16 to 19 digits with their Luhn digit, and bank codes bounded before any of them
is looked at."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from cardcheck.banks import MAX_BANK_CODES
from cardcheck.numbers import id_check_digit, id_number_valid, luhn_check_digit
from cardcheck.runtime.errors import CardCheckError
from gateway.validation import Violations, known_banks, today_in_china


def _id_number(birth: str, serial: str = "123") -> str:
    first17 = f"110105{birth}{serial}"
    return first17 + id_check_digit(first17)


def _checked(check, *args) -> list[tuple[str, str]]:
    violations = Violations()
    check(violations, *args)
    return [(v.field, v.description) for v in violations.items]


def test_the_id_check_digit_of_gb_11643():
    assert id_check_digit("11010519491231002") == "X"
    assert id_number_valid("11010519491231002X") and id_number_valid("11010519491231002x")
    assert not id_number_valid("110105194912310021")
    assert not id_number_valid(_id_number("18991231"))  # before 1900
    assert id_number_valid(_id_number("19000101"))
    assert not id_number_valid(_id_number("20230229"))  # no such day


def test_a_birth_date_may_be_today_in_china_but_not_tomorrow():
    born = _id_number("20260106")
    midnight_in_china = datetime(2026, 1, 5, 16, 0, tzinfo=UTC)
    before = today_in_china(midnight_in_china - timedelta(seconds=1))
    assert before == date(2026, 1, 5) and today_in_china(midnight_in_china) == date(2026, 1, 6)
    assert _checked(Violations.id_number, born, before) == [
        ("id_number", "not a valid 18-character resident ID number")
    ]
    assert _checked(Violations.id_number, born, today_in_china(midnight_in_china)) == []
    assert _checked(Violations.id_number, "", before) == [("id_number", "required")]


@pytest.mark.parametrize(
    "phone, valid",
    [("13012345678", True), ("19912345678", True), ("12012345678", False), ("1391234567", False),
     ("139123456789", False), ("13912345678\n", False), ("１３９12345678", False)],
)
def test_a_mainland_mobile_number(phone, valid):
    expected = [] if valid else [("phone", "not a mainland mobile number (11 digits starting 13-19)")]
    assert _checked(Violations.phone, phone) == expected


@pytest.mark.parametrize("length, valid", [(15, False), (16, True), (19, True), (20, False)])
def test_a_card_number_has_16_to_19_digits_and_its_luhn_digit(length, valid):
    body = "6" + "2" * (length - 2)
    number = body + luhn_check_digit(body)
    expected = [] if valid else [("card_number", "not a valid card number (16-19 digits, Luhn)")]
    assert _checked(Violations.card_number, number) == expected
    if valid:
        wrong = body + str((int(luhn_check_digit(body)) + 1) % 10)
        assert _checked(Violations.card_number, wrong) == [
            ("card_number", "not a valid card number (16-19 digits, Luhn)")
        ]


def test_bank_codes_are_counted_before_any_is_looked_at():
    assert _checked(Violations.bank_codes, ["ICBC"] * MAX_BANK_CODES) == []
    assert _checked(Violations.bank_codes, ["<junk>"] * (MAX_BANK_CODES + 1)) == [
        ("bank_codes", f"too many bank codes ({MAX_BANK_CODES + 1}; at most {MAX_BANK_CODES})")
    ]
    assert _checked(Violations.bank_codes, ["ICBC", "", "a b"]) == [
        ("bank_codes[1]", "empty bank code"),
        ("bank_codes[2]", "not a bank code (1-32 letters, digits, '_' or '-')"),
    ]


def test_known_banks_in_the_order_given_once_each_and_every_unknown_one_named():
    assert known_banks(["CMB", "ICBC", "CMB"]) == ["CMB", "ICBC"]
    with pytest.raises(CardCheckError) as caught:
        known_banks(["NOPE", "ICBC", "ZZZ", "NOPE"])
    assert caught.value.reason == "UNKNOWN_BANK"
    assert caught.value.metadata == {"bank_code": "NOPE", "bank_codes": "NOPE,ZZZ"}
    assert [v.field for v in caught.value.violations] == ["bank_codes[0]", "bank_codes[2]", "bank_codes[3]"]


@pytest.mark.parametrize(
    "key, valid", [("", True), ("k" * 128, True), ("k" * 129, False), ("a b", False), ("é", False)]
)
def test_an_idempotency_key_is_up_to_128_printable_ascii_characters(key, valid):
    expected = [] if valid else [("idempotency_key", "1-128 printable ASCII characters without spaces")]
    assert _checked(Violations.idempotency_key, key) == expected


def test_every_mistake_of_a_request_is_named_at_once():
    violations = Violations()
    violations.phone("12")
    violations.payment_password("12345")
    violations.challenge("nope", "")
    with pytest.raises(CardCheckError) as caught:
        violations.raise_if_any()
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert [v.field for v in caught.value.violations] == ["phone", "payment_password", "challenge_id", "sms_code"]
    Violations().raise_if_any()  # nothing to say: no refusal
