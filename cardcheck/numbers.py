"""Check digits of the numbers the service handles: resident ID numbers (GB 11643-1999) and
card numbers (Luhn)."""

from __future__ import annotations

from datetime import date

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def ascii_digits(text: str) -> bool:
    """Only 0-9: str.isdigit also accepts other scripts' digits and superscripts."""
    return text.isascii() and text.isdigit()


def id_check_digit(first17: str) -> str:
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def id_birth_date(id_number: str) -> date | None:
    try:
        return date(int(id_number[6:10]), int(id_number[10:12]), int(id_number[12:14]))
    except ValueError:
        return None


def id_number_valid(id_number: str, today: date | None = None) -> bool:
    """18 characters, 17 digits then a digit or X, a real birth date not in the future, and the
    GB 11643 check digit."""
    if len(id_number) != 18 or not ascii_digits(id_number[:17]):
        return False
    check = id_number[17].upper()
    if not (ascii_digits(check) or check == "X"):
        return False
    birth = id_birth_date(id_number)
    if birth is None or birth.year < 1900 or (today is not None and birth > today):
        return False
    return id_check_digit(id_number[:17]) == check


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # a digit doubled, its two digits summed


def luhn_check_digit(partial: str) -> str:
    digits = list(map(int, partial))
    # from the right, every other digit starting with the last is doubled once the check
    # digit is appended
    total = sum(digits[-2::-2]) + sum(_DOUBLED[d] for d in digits[-1::-2])
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    return len(number) >= 2 and ascii_digits(number) and luhn_check_digit(number[:-1]) == number[-1]


def card_number_valid(number: str) -> bool:
    return 16 <= len(number) <= 19 and luhn_valid(number)
