"""The bank dataset (`cardcheck-bank-dataset/1`, see FORMAT.md): the cards the 24 banks hold.

Loading validates every line and refuses the whole file at the first bad one, naming its line.
`generate` makes a deterministic synthetic population (realistic names, valid ID numbers,
mainland mobiles, Luhn-valid UnionPay card numbers) with every case FORMAT.md describes.

    python -m cardcheck.dataset generate --seed 20261124 --people 200 -o cards.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from cardcheck import bins
from cardcheck.banks import BANK_CODES, BY_CODE
from cardcheck.numbers import card_number_valid, id_check_digit, id_number_valid, luhn_check_digit

FORMAT_NAME = "cardcheck-bank-dataset/1"
DEFAULT_SEED = 20261124
DEFAULT_PEOPLE = 200

CARD_TYPES = ("DEBIT", "CREDIT")
STATUSES = ("ACTIVE", "DORMANT", "FROZEN", "CLOSED")
FIELDS = (
    "bank", "pan", "card_type", "holder_name", "id_number", "id_expiry", "reserved_phone",
    "cnp_enabled", "status", "opened_on",
)

# GB/T 2260 province codes (an ID number's first two digits) to ISO 3166-2:CN, the 31 regions.
PROVINCE_REGIONS: dict[str, str] = {
    "11": "CN-BJ", "12": "CN-TJ", "13": "CN-HE", "14": "CN-SX", "15": "CN-NM",
    "21": "CN-LN", "22": "CN-JL", "23": "CN-HL",
    "31": "CN-SH", "32": "CN-JS", "33": "CN-ZJ", "34": "CN-AH", "35": "CN-FJ", "36": "CN-JX", "37": "CN-SD",
    "41": "CN-HA", "42": "CN-HB", "43": "CN-HN", "44": "CN-GD", "45": "CN-GX", "46": "CN-HI",
    "50": "CN-CQ", "51": "CN-SC", "52": "CN-GZ", "53": "CN-YN", "54": "CN-XZ",
    "61": "CN-SN", "62": "CN-GS", "63": "CN-QH", "64": "CN-NX", "65": "CN-XJ",
}

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class DatasetError(ValueError):
    """A dataset line that does not parse or breaks a FORMAT.md rule; `line` is 1-based."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class CardRecord:
    """One card as a bank holds it."""

    bank: str
    pan: str
    card_type: str  # DEBIT or CREDIT
    holder_name: str
    id_number: str  # as on the bank's record; the check digit may be x or X
    id_expiry: date | None  # None = long-term
    reserved_phone: str | None  # None = no phone reserved
    cnp_enabled: bool
    status: str  # ACTIVE, DORMANT, FROZEN or CLOSED
    opened_on: date

    def to_json(self) -> dict[str, object]:
        return {
            "bank": self.bank,
            "pan": self.pan,
            "card_type": self.card_type,
            "holder_name": self.holder_name,
            "id_number": self.id_number,
            "id_expiry": self.id_expiry.isoformat() if self.id_expiry else None,
            "reserved_phone": self.reserved_phone,
            "cnp_enabled": self.cnp_enabled,
            "status": self.status,
            "opened_on": self.opened_on.isoformat(),
        }


@dataclass(frozen=True)
class Person:
    """Someone from the dataset who can register and query (the demo uses one)."""

    name: str
    id_number: str
    phone: str
    card_number: str
    region: str


# --- loading -------------------------------------------------------------------------------


def _string(obj: dict[str, Any], name: str, line: int) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise DatasetError(line, f"{name} must be a string")
    return value


def _date(obj: dict[str, Any], name: str, line: int, *, nullable: bool) -> date | None:
    value = obj[name]
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        kind = "YYYY-MM-DD or null" if nullable else "YYYY-MM-DD"
        raise DatasetError(line, f"{name} must be {kind}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise DatasetError(line, f"{name} is not a real date") from None


def parse_record(obj: object, line: int) -> CardRecord:
    """One decoded JSON line to a CardRecord, checking every FORMAT.md rule."""
    if not isinstance(obj, dict):
        raise DatasetError(line, "a line must be a JSON object")
    missing = [name for name in FIELDS if name not in obj]
    if missing:
        raise DatasetError(line, f"missing field(s): {', '.join(missing)}")

    bank = _string(obj, "bank", line)
    if bank not in BY_CODE:
        raise DatasetError(line, f"unknown bank code {bank!r}")
    pan = _string(obj, "pan", line)
    if not pan.isascii() or not pan.isdigit() or not 16 <= len(pan) <= 19:
        raise DatasetError(line, "pan must be 16 to 19 digits")
    if not card_number_valid(pan):
        raise DatasetError(line, "pan fails the Luhn check")
    card_type = _string(obj, "card_type", line)
    if card_type not in CARD_TYPES:
        raise DatasetError(line, "card_type must be DEBIT or CREDIT")
    holder_name = _string(obj, "holder_name", line)
    if not holder_name.strip():
        raise DatasetError(line, "holder_name must not be empty")
    id_number = _string(obj, "id_number", line)
    if not id_number.isascii() or not id_number_valid(id_number):
        raise DatasetError(line, "id_number is not a valid 18-character resident ID number")
    id_expiry = _date(obj, "id_expiry", line, nullable=True)
    reserved_phone = obj["reserved_phone"]
    if reserved_phone is not None:
        if not isinstance(reserved_phone, str):
            raise DatasetError(line, "reserved_phone must be a string or null")
        if not reserved_phone.strip():
            raise DatasetError(line, "reserved_phone must not be empty (null means none)")
    cnp_enabled = obj["cnp_enabled"]
    if not isinstance(cnp_enabled, bool):
        raise DatasetError(line, "cnp_enabled must be true or false")
    status = _string(obj, "status", line)
    if status not in STATUSES:
        raise DatasetError(line, "status must be ACTIVE, DORMANT, FROZEN or CLOSED")
    opened_on = _date(obj, "opened_on", line, nullable=False)
    assert opened_on is not None
    return CardRecord(
        bank=bank,
        pan=pan,
        card_type=card_type,
        holder_name=holder_name,
        id_number=id_number,
        id_expiry=id_expiry,
        reserved_phone=reserved_phone,
        cnp_enabled=cnp_enabled,
        status=status,
        opened_on=opened_on,
    )


def _objects(lines: Iterable[str | bytes]) -> Iterator[tuple[int, object]]:
    """Each non-blank line decoded from JSON, with its 1-based number."""
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(number, "not UTF-8") from None
        else:
            text = raw
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        stripped = text.strip(_JSON_SPACE)
        try:  # the decoder's scanner alone: json.loads less its per-call overhead
            obj, end = _scan(stripped, 0)
        except (StopIteration, ValueError):
            end = -1
        if end != len(stripped):
            obj = _loads(number, text)
        yield number, obj


_JSON_SPACE = " \t\r\n"
# The decoder's scanner (set in JSONDecoder.__init__, absent from the stdlib's stubs).
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(number: int, text: str) -> object:
    """json.loads, its refusal a DatasetError naming the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(number, f"not valid JSON ({error.msg}, column {error.colno})") from None


def iter_records(lines: Iterable[str | bytes]) -> Iterator[CardRecord]:
    """Validated records from JSON lines (str, or UTF-8 bytes); fully blank lines are skipped.
    A card number held twice by the same bank is refused too: a bank's numbers are unique."""
    seen: dict[tuple[str, str], int] = {}
    for number, obj in _objects(lines):
        record = parse_record(obj, number)
        key = (record.bank, record.pan)
        if key in seen:
            raise DatasetError(number, f"{record.bank} already holds this pan (line {seen[key]})")
        seen[key] = number
        yield record


# --- rows: what a bank needs to answer, for millions of cards --------------------------------

# A row: (bank, pan, card_type, holder_name, id_number, id_expiry, reserved_phone, cnp_enabled,
# status), validated by exactly the rules of parse_record (opened_on is checked, not kept).
CardRow = tuple[str, str, str, str, str, "date | None", "str | None", bool, str]

_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_WEIGHTS_ZERO = 48 * sum(_ID_WEIGHTS)  # what the weights add up to over the digits' ASCII zeros
_ID_CHECKS = "10X98765432"


def row_of(record: CardRecord) -> CardRow:
    return (
        record.bank, record.pan, record.card_type, record.holder_name, record.id_number, record.id_expiry,
        record.reserved_phone, record.cnp_enabled, record.status,
    )


class _RowParser:
    """parse_record's rules, checked the fast way; whatever the fast way does not accept goes
    to parse_record itself, which names what is wrong (or accepts it after all). Dates are
    remembered: a million cards have only thousands of distinct dates."""

    def __init__(self) -> None:
        self._dates: dict[str, date] = {}
        self._births: set[str] = set()

    def _date(self, value: object) -> date | None:
        if type(value) is not str:
            return None
        known = self._dates.get(value)
        if known is None and _DATE.fullmatch(value):
            try:
                known = self._dates[value] = date.fromisoformat(value)
            except ValueError:
                return None
        return known

    def _id_valid(self, id_number: object) -> bool:
        if type(id_number) is not str or len(id_number) != 18 or not id_number.isascii():
            return False
        first17 = id_number[:17]
        if not first17.isdigit():
            return False
        total = sum(map(int.__mul__, first17.encode(), _ID_WEIGHTS)) - _ID_WEIGHTS_ZERO
        if _ID_CHECKS[total % 11] != id_number[17].upper():
            return False
        birth = id_number[6:14]
        if birth in self._births:
            return True
        try:
            year = int(birth[:4])
            date(year, int(birth[4:6]), int(birth[6:]))
        except ValueError:
            return False
        if year < 1900:
            return False
        self._births.add(birth)
        return True

    def row(self, obj: object, line: int) -> CardRow:
        if type(obj) is not dict or len(obj) < len(FIELDS):
            return row_of(parse_record(obj, line))
        try:
            bank = obj["bank"]
            pan = obj["pan"]
            card_type = obj["card_type"]
            holder_name = obj["holder_name"]
            id_number = obj["id_number"]
            raw_expiry = obj["id_expiry"]
            phone = obj["reserved_phone"]
            cnp = obj["cnp_enabled"]
            status = obj["status"]
            opened_on = obj["opened_on"]
        except KeyError:
            return row_of(parse_record(obj, line))
        expiry = None if raw_expiry is None else self._date(raw_expiry)
        if (
            type(bank) is str and bank in BY_CODE
            and type(pan) is str and 16 <= len(pan) <= 19 and pan.isascii() and pan.isdigit()
            and _luhn_ok(pan)
            and type(card_type) is str and card_type in CARD_TYPES
            and type(holder_name) is str and holder_name.strip()
            and self._id_valid(id_number)
            and (raw_expiry is None or expiry is not None)
            and (phone is None or (type(phone) is str and phone.strip()))
            and type(cnp) is bool
            and type(status) is str and status in STATUSES
            and self._date(opened_on) is not None
        ):
            return (bank, pan, card_type, holder_name, id_number, expiry, phone, cnp, status)
        return row_of(parse_record(obj, line))


def _luhn_ok(digits: str) -> bool:
    reverse = digits.encode()[::-1]
    odd, even = reverse[0::2], reverse[1::2]
    return (sum(odd) + sum(even.translate(_LUHN_DOUBLED)) - 48 * len(reverse)) % 10 == 0


def iter_rows(lines: Iterable[str | bytes]) -> Iterator[tuple[int, CardRow]]:
    """Validated rows with their line numbers, by the rules of iter_records, light enough for
    millions of cards. A pan held twice by one bank is NOT checked here: the caller, which
    indexes the rows anyway, does that (see bank_sim.issuers)."""
    parser = _RowParser()
    row = parser.row
    for number, obj in _objects(lines):
        yield number, row(obj, number)


def load(path: str | Path) -> list[CardRecord]:
    """Every record of the file, or DatasetError naming the first bad line (nothing half-loaded).
    Missing or unreadable files raise OSError."""
    with Path(path).open("rb") as stream:
        return list(iter_records(stream))


def dumps_record(record: CardRecord) -> str:
    return json.dumps(record.to_json(), ensure_ascii=False)


def dump(records: Iterable[CardRecord], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8", newline="\n") as out:
        for record in records:
            out.write(dumps_record(record) + "\n")


# --- people --------------------------------------------------------------------------------


def region_of(id_number: str) -> str | None:
    """The ISO 3166-2:CN region of an ID number's province code, or None."""
    return PROVINCE_REGIONS.get(id_number[:2])


def _findable_anywhere(record: CardRecord) -> bool:
    return record.status == "ACTIVE" and record.cnp_enabled and record.reserved_phone is not None


def pick_demo_person(records: Sequence[CardRecord]) -> Person:
    """The person (first in file order among equals) with the most cards who has an ACTIVE,
    card-not-present-enabled card with a reserved phone: that card and phone let them register."""
    counts: dict[str, int] = {}
    first_card: dict[str, CardRecord] = {}
    order: list[str] = []
    for record in records:
        key = record.id_number.upper()
        if key not in counts:
            counts[key] = 0
            order.append(key)
        counts[key] += 1
        if key not in first_card and _findable_anywhere(record) and region_of(key) is not None:
            first_card[key] = record
    best: str | None = None
    for key in order:
        if key in first_card and (best is None or counts[key] > counts[best]):
            best = key
    if best is None:
        raise DatasetError(None, "nobody in the dataset has an ACTIVE card with a reserved phone")
    card = first_card[best]
    assert card.reserved_phone is not None
    return Person(
        name=card.holder_name,
        id_number=best,
        phone=card.reserved_phone,
        card_number=card.pan,
        region=PROVINCE_REGIONS[best[:2]],
    )


# --- generation ----------------------------------------------------------------------------

_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕"
    "丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严武戴孔"
)
_GIVEN_MALE = "伟强磊军勇杰涛斌超明刚平辉鹏华飞鑫波宇浩凯健俊帆旭宁龙林洋博文建国志海峰晨阳振鸿毅坤"
_GIVEN_FEMALE = "芳娜敏静丽艳娟霞燕玲婷雪慧琳颖倩洁欣悦佳梅莉萍红月蕾薇晶璐婧瑶怡楠琪雯丹蓉"

# Real county-level division codes (GB/T 2260), several per region with a regional bank.
_COUNTIES = (
    "110101", "110102", "110105", "110108", "120101", "120104", "130102", "130602", "140105", "150102",
    "210102", "210202", "220102", "220104", "220202", "230102", "310101", "310104", "310115", "320102",
    "320506", "330106", "330203", "340102", "350102", "350203", "360102", "370102", "370202", "410105",
    "420106", "430104", "440104", "440106", "440304", "450103", "460106", "500103", "500106", "510104",
    "510107", "520102", "530102", "540102", "610113", "620102", "630102", "640104", "650102",
)
_MOBILE_PREFIXES = (
    "130", "131", "132", "133", "134", "135", "136", "137", "138", "139", "150", "151", "152", "153",
    "155", "156", "157", "158", "159", "166", "173", "177", "180", "181", "182", "183", "185", "186",
    "187", "188", "189", "191", "198", "199",
)
# UnionPay BINs (62xxxx) and card-number lengths per bank: (debit, credit). Each BIN must be
# one the bank claims in the BIN table (cardcheck/bins.json): `generate` refuses to run otherwise.
_BINS: dict[str, tuple[tuple[str, int], tuple[str, int]]] = {
    "ICBC": (("621226", 19), ("625330", 16)),
    "ABC": (("622848", 19), ("622836", 16)),
    "BOC": (("621661", 19), ("625907", 16)),
    "CCB": (("621700", 19), ("625362", 16)),
    "COMM": (("622262", 19), ("625028", 16)),
    "PSBC": (("621799", 19), ("625919", 16)),
    "CITIC": (("621771", 16), ("622918", 16)),
    "CEB": (("621489", 16), ("625978", 16)),
    "CMB": (("621485", 16), ("622575", 16)),
    "SPDB": (("621792", 16), ("625957", 16)),
    "CMBC": (("621691", 16), ("622615", 16)),
    "HXBANK": (("622632", 19), ("625969", 16)),
    "SPABANK": (("622298", 19), ("625361", 16)),
    "CIB": (("622909", 18), ("625087", 16)),
    "GDB": (("621462", 19), ("625809", 16)),
    "CZBANK": (("621527", 19), ("625821", 16)),
    "BOHAIB": (("621268", 19), ("625122", 16)),
    "BJBANK": (("621468", 17), ("625816", 16)),
    "SHBANK": (("621243", 19), ("625099", 16)),
    "CQBANK": (("622368", 18), ("625872", 16)),
    "CQFMB": (("623209", 19), ("625526", 16)),
    "JLYLB": (("623306", 19), ("625506", 16)),
    "JLRCU": (("621258", 19), ("625560", 16)),
    "GDRCC": (("621728", 19), ("625521", 16)),
}
# Regional banks serve their own region's people above all.
_HOME_PROVINCE = {
    "BJBANK": "11", "SHBANK": "31", "CQBANK": "50", "CQFMB": "50", "JLYLB": "22", "JLRCU": "22",
    "GDRCC": "44",
}
_DEMO_COUNTIES = ("110105", "220102", "310104", "440106", "500103")  # regions with a regional bank
_REFERENCE_DAY = date(2026, 1, 1)  # expired expiries lie before it, valid ones well after it


@dataclass(frozen=True)
class _Human:
    name: str
    id_number: str
    phone: str
    birth: date


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ids: set[str] = set()
        self.phones: set[str] = set()
        self.pans: set[str] = set()

    def name(self, male: bool) -> str:
        rng = self.rng
        chars = _GIVEN_MALE if male else _GIVEN_FEMALE
        given = "".join(rng.choice(chars) for _ in range(rng.choice((1, 2, 2))))
        return rng.choice(_SURNAMES) + given

    def id_number(self, birth: date, counties: Sequence[str], *, check: str | None = None) -> str:
        while True:
            county = self.rng.choice(counties)
            first17 = f"{county}{birth:%Y%m%d}{self.rng.randrange(1000):03d}"
            digit = id_check_digit(first17)
            candidate = first17 + digit
            if (check is None or digit == check) and candidate not in self.ids:
                self.ids.add(candidate)
                return candidate

    def phone(self) -> str:
        while True:
            candidate = self.rng.choice(_MOBILE_PREFIXES) + f"{self.rng.randrange(10**8):08d}"
            if candidate not in self.phones:
                self.phones.add(candidate)
                return candidate

    def pan(self, bank: str, card_type: str) -> str:
        bin_, length = _BINS[bank][CARD_TYPES.index(card_type)]
        while True:
            body = bin_ + "".join(str(self.rng.randrange(10)) for _ in range(length - len(bin_) - 1))
            candidate = body + luhn_check_digit(body)
            if candidate not in self.pans:
                self.pans.add(candidate)
                return candidate

    def human(self, counties: Sequence[str] = _COUNTIES, *, check: str | None = None) -> _Human:
        rng = self.rng
        birth = date(1955, 1, 1) + timedelta(days=rng.randrange((date(2006, 12, 31) - date(1955, 1, 1)).days))
        id_number = self.id_number(birth, counties, check=check)
        male = int(id_number[16]) % 2 == 1
        return _Human(self.name(male), id_number, self.phone(), birth)

    def banks_for(self, human: _Human, count: int) -> list[str]:
        """`count` banks (weighted, no repeats), national ones and the person's regional ones first."""
        province = human.id_number[:2]
        pool = list(BANK_CODES)
        weights = [
            (6 if _HOME_PROVINCE[code] == province else 0.3) if code in _HOME_PROVINCE else 3
            for code in pool
        ]
        chosen: list[str] = []
        for _ in range(min(count, len(pool))):
            (pick,) = self.rng.choices(range(len(pool)), weights=weights)
            chosen.append(pool.pop(pick))
            weights.pop(pick)
        return chosen

    def expiry(self, human: _Human) -> date | None:
        """An ID's expiry as a bank keeps it: long-term for the older, else a date well ahead."""
        age = _REFERENCE_DAY.year - human.birth.year
        if age >= 46 and self.rng.random() < 0.85:
            return None
        return date(2031, 1, 1) + timedelta(days=self.rng.randrange(15 * 365))

    def opened_on(self, human: _Human) -> date:
        start = max(date(human.birth.year + 16, 1, 1), date(2000, 1, 1))
        span = max((date(2025, 12, 31) - start).days, 1)
        return start + timedelta(days=self.rng.randrange(span))

    def card(self, human: _Human, bank: str, card_type: str | None = None) -> CardRecord:
        rng = self.rng
        card_type = card_type or rng.choices(CARD_TYPES, weights=(3, 2))[0]
        status = rng.choices(STATUSES, weights=(80, 8, 5, 7))[0]
        phone_roll = rng.random()
        if phone_roll < 0.10:
            reserved: str | None = None
        elif phone_roll < 0.25:
            reserved = self.phone()  # an old number never updated at the bank
        else:
            reserved = human.phone
        expiry = self.expiry(human)
        if rng.random() < 0.07:  # the bank still holds an expired ID
            expiry = date(2016, 1, 1) + timedelta(days=rng.randrange(9 * 365))
        return CardRecord(
            bank=bank,
            pan=self.pan(bank, card_type),
            card_type=card_type,
            holder_name=human.name,
            id_number=human.id_number,
            id_expiry=expiry,
            reserved_phone=reserved,
            cnp_enabled=rng.random() >= 0.08,
            status=status,
            opened_on=self.opened_on(human),
        )

    def demo_cards(self, human: _Human) -> list[CardRecord]:
        """Five findable cards at five banks (debit and credit, one of each of DORMANT, FROZEN and
        an old reserved phone), then one CLOSED card that no lookup finds."""
        banks = self.banks_for(human, 6)
        shapes = [
            ("DEBIT", "ACTIVE", human.phone),
            ("CREDIT", "ACTIVE", human.phone),
            ("DEBIT", "DORMANT", human.phone),
            ("CREDIT", "FROZEN", human.phone),
            ("DEBIT", "ACTIVE", self.phone()),
            ("DEBIT", "CLOSED", human.phone),
        ]
        cards = []
        for bank, (card_type, status, phone) in zip(banks, shapes, strict=True):
            card = self.card(human, bank, card_type)
            cards.append(
                replace(
                    card, status=status, reserved_phone=phone, cnp_enabled=True,
                    id_expiry=None if human.birth.year < 1970 else date(2040, 6, 30),
                )
            )
        return cards


def _ensure_every_case(population: list[tuple[_Human, list[CardRecord]]]) -> None:
    """Random draws may miss a case in a small population: force each missing one onto a card
    of someone other than the demo person (who comes first), a different card each time."""
    cases: list[tuple[Callable[[_Human, CardRecord], bool], Callable[[_Human, CardRecord], CardRecord]]] = [
        (lambda h, c: c.status == "CLOSED", lambda h, c: replace(c, status="CLOSED")),
        (lambda h, c: c.status == "DORMANT", lambda h, c: replace(c, status="DORMANT")),
        (lambda h, c: c.status == "FROZEN", lambda h, c: replace(c, status="FROZEN")),
        (lambda h, c: c.reserved_phone is None, lambda h, c: replace(c, reserved_phone=None)),
        (
            lambda h, c: c.reserved_phone is not None and c.reserved_phone != h.phone,
            lambda h, c: replace(c, reserved_phone="139" + h.phone[3:][::-1]),
        ),
        (
            lambda h, c: c.id_expiry is not None and c.id_expiry < _REFERENCE_DAY,
            lambda h, c: replace(c, id_expiry=date(2024, 3, 1)),
        ),
        (lambda h, c: not c.cnp_enabled, lambda h, c: replace(c, cnp_enabled=False)),
        (
            lambda h, c: c.id_number.endswith("x"),
            lambda h, c: replace(c, id_number=c.id_number[:17] + "x") if c.id_number.endswith("X") else c,
        ),
    ]
    slots = [(p, i) for p in range(1, len(population)) for i in range(len(population[p][1]))]
    if not slots:
        return
    next_slot = 0
    for present, force in cases:
        if any(present(h, c) for h, cards in population[1:] for c in cards):
            continue
        for offset in range(len(slots)):
            p, i = slots[(next_slot + offset) % len(slots)]
            human, cards = population[p]
            forced = force(human, cards[i])
            if forced != cards[i]:
                cards[i] = forced
                next_slot = (next_slot + offset + 1) % len(slots)
                break


def check_bins(table: bins.BinTable) -> None:
    """Every BIN the generator uses is one its bank claims in `table`: a generated card must
    reach its own bank when the real-name check routes it by BIN. ValueError otherwise."""
    for bank, kinds in _BINS.items():
        for bin_, _ in kinds:
            issuer = table.issuer_of(bin_)
            if issuer != bank:
                raise ValueError(f"the generator gives {bank} the BIN {bin_}, which the BIN table gives to {issuer}")


def generate(seed: int = DEFAULT_SEED, people: int = DEFAULT_PEOPLE) -> list[CardRecord]:
    """A deterministic synthetic population: the same seed gives the same records. The first
    person is the demo person (see `pick_demo_person`); with a handful of people or more, every
    case of FORMAT.md is in it."""
    if people < 1:
        raise ValueError("people must be at least 1")
    check_bins(bins.default_table())
    gen = _Generator(seed)
    rng = gen.rng
    demo = gen.human(_DEMO_COUNTIES)
    population: list[tuple[_Human, list[CardRecord]]] = [(demo, gen.demo_cards(demo))]
    for index in range(1, people):
        # The second person has an X check digit, kept lower-case by some of their banks.
        human = gen.human(check="X" if index == 1 else None)
        count = rng.choices((1, 2, 3, 4, 5, 6), weights=(15, 25, 25, 17, 10, 8))[0]
        cards = [gen.card(human, bank) for bank in gen.banks_for(human, count)]
        if human.id_number.endswith("X"):
            cards = [
                replace(c, id_number=c.id_number[:17] + "x") if i == 0 or rng.random() < 0.3 else c
                for i, c in enumerate(cards)
            ]
        population.append((human, cards))
    _ensure_every_case(population)
    return [card for _, cards in population for card in cards]


# --- command -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cardcheck.dataset", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help=f"write a synthetic {FORMAT_NAME} file")
    gen.add_argument("--seed", type=int, default=DEFAULT_SEED)
    gen.add_argument("--people", type=int, default=DEFAULT_PEOPLE)
    gen.add_argument("-o", "--output", required=True, type=Path)
    check = commands.add_parser("check", help="validate a dataset file")
    check.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.people < 1:
            parser.error("--people must be at least 1")
        records = generate(args.seed, args.people)
        dump(records, args.output)
        print(f"wrote {len(records)} cards of {args.people} people to {args.output}")
        return 0
    try:
        records = load(args.path)
    except (DatasetError, OSError) as error:
        print(f"{args.path}: {error}", file=sys.stderr)
        return 2
    print(f"{args.path}: {len(records)} cards, valid {FORMAT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
