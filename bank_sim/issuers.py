"""What the banks hold and how they answer (FORMAT.md "What a bank answers"); no gRPC here."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cardcheck.banks import BANK_CODES
from cardcheck.dataset import CardRecord, CardRow, DatasetError, iter_rows, row_of

try:
    BANK_TIME_ZONE: timezone | ZoneInfo = ZoneInfo("Asia/Shanghai")
except ZoneInfoNotFoundError:  # no tz database in a slim image; China keeps UTC+8 all year
    BANK_TIME_ZONE = timezone(timedelta(hours=8), "CST")


def bank_day(instant: datetime) -> date:
    """The calendar day the banks are on at an instant (they keep Beijing time)."""
    return instant.astimezone(BANK_TIME_ZONE).date()


CARD_TYPES = ("DEBIT", "CREDIT")
_BANK_INDEX = {code: index for index, code in enumerate(BANK_CODES)}
# Per-card flags: what answering needs of the type, the status, the phone and card-not-present.
_CREDIT = 1
_CLOSED = 2
_LISTED = 4  # not closed, a reserved phone, card-not-present on: found unless the ID has expired
_NO_PHONE = -1


def id_key(id_number: str) -> int | None:
    """An ID number as one integer, the check digit's case ignored (None: not ID-shaped)."""
    if len(id_number) != 18 or not id_number.isascii() or not id_number[:17].isdigit():
        return None
    check = id_number[17]
    if check in "xX":
        return int(id_number[:17]) * 11 + 10
    return int(id_number[:17]) * 11 + int(check) if check.isdigit() else None


def _plain_number(text: str) -> bool:
    """Digits that survive a round trip through an integer (no leading zero)."""
    return text.isascii() and text.isdigit() and len(text) <= 18 and (text[0] != "0" or text == "0")


@dataclass(frozen=True)
class FoundCard:
    pan: str
    card_type: str  # DEBIT or CREDIT


@dataclass(frozen=True)
class Verification:
    holds_card: bool  # this bank issued the card and it is not closed
    confirmed: bool  # and the name, ID and reserved phone all match


class Issuers:
    """The cards of every bank, kept compact (a few dozen bytes a card, in columns) and indexed
    by ID number and by card number: only what answering needs. A million cards load in
    seconds and take tens of megabytes."""

    def __init__(self, records: Iterable[CardRecord] = ()) -> None:
        self._build(((number, row_of(record)) for number, record in enumerate(records, start=1)), strict=False)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, CardRow]]) -> Issuers:
        """From validated rows and their line numbers; DatasetError for a pan a bank holds twice."""
        issuers = cls.__new__(cls)
        issuers._build(rows, strict=True)
        return issuers

    def _build(self, rows: Iterable[tuple[int, CardRow]], *, strict: bool) -> None:
        self._bank = array("B")
        self._flags = array("B")
        self._expiry = array("i")  # date ordinal; 0 = long-term
        self._name = array("I")  # into self._names
        self._phone = array("q")  # the number itself, _NO_PHONE, or -2 - index into self._odd_phones
        self._pan = array("Q")
        self._pan_length = array("B")
        self._id = array("Q")
        self._names: list[str] = []
        self._odd_phones: list[str] = []
        self._name_index: dict[str, int] = {}
        lines = array("I")
        # One pass, every column appended through a local name: a million cards take seconds.
        banks, flags_of, expiries, names_of, phones = self._bank, self._flags, self._expiry, self._name, self._phone
        pans, pan_lengths, ids = self._pan, self._pan_length, self._id
        name_index, names, odd_phones = self._name_index, self._names, self._odd_phones
        for number, (bank, pan, card_type, name, id_number, expiry, phone, cnp, status) in rows:
            banks.append(_BANK_INDEX[bank])
            flags = _CREDIT if card_type == "CREDIT" else 0
            if status == "CLOSED":
                flags |= _CLOSED
            elif phone is not None and cnp:
                flags |= _LISTED
            flags_of.append(flags)
            expiries.append(expiry.toordinal() if expiry is not None else 0)
            index = name_index.get(name)
            if index is None:
                index = name_index[name] = len(names)
                names.append(name)
            names_of.append(index)
            if phone is None:
                phones.append(_NO_PHONE)
            elif _plain_number(phone):
                phones.append(int(phone))
            else:
                phones.append(-2 - len(odd_phones))
                odd_phones.append(phone)
            pans.append(int(pan))
            pan_lengths.append(len(pan))
            key = id_key(id_number)
            assert key is not None  # rows are validated
            ids.append(key)
            lines.append(number)
        self._freeze(lines, refuse_duplicates=strict)

    @classmethod
    def from_file(cls, path: str | Path) -> Issuers:
        """Loads and validates a dataset file line by line (DatasetError, OSError)."""
        with Path(path).open("rb") as stream:
            return cls.from_rows(iter_rows(stream))

    def _freeze(self, lines: array[int], *, refuse_duplicates: bool) -> None:
        self._name_index = {}
        by_id = sorted(range(len(self._id)), key=self._id.__getitem__)  # stable: dataset order kept
        self._by_id = array("I", by_id)
        self._id_sorted = array("Q", map(self._id.__getitem__, by_id))
        del by_id
        by_pan = sorted(range(len(self._pan)), key=self._pan.__getitem__)
        self._by_pan = array("I", by_pan)
        self._pan_sorted = array("Q", map(self._pan.__getitem__, by_pan))
        del by_pan
        if refuse_duplicates:
            self._refuse_duplicates(lines)

    def _refuse_duplicates(self, lines: array[int]) -> None:
        """The first line (in file order) whose pan its bank already holds, as iter_records says."""
        first_bad: tuple[int, int] | None = None  # (line, earlier line)
        pans, order = self._pan_sorted, self._by_pan
        run_start = 0
        for position in range(1, len(pans) + 1):
            if position < len(pans) and pans[position] == pans[run_start]:
                continue
            if position - run_start > 1:  # the same number more than once: same bank and length?
                seen: dict[tuple[int, int], int] = {}
                for card in sorted(order[run_start:position], key=lines.__getitem__):
                    key = (self._bank[card], self._pan_length[card])
                    if key in seen:
                        if first_bad is None or lines[card] < first_bad[0]:
                            first_bad = (lines[card], lines[seen[key]])
                    else:
                        seen[key] = card
            run_start = position
        if first_bad is not None:
            line, earlier = first_bad
            card = next(c for c in range(len(lines)) if lines[c] == line)
            raise DatasetError(line, f"{BANK_CODES[self._bank[card]]} already holds this pan (line {earlier})")

    def __len__(self) -> int:
        return len(self._bank)

    def _pan_of(self, card: int) -> str:
        return str(self._pan[card]).zfill(self._pan_length[card])

    def _phone_of(self, card: int) -> str | None:
        value = self._phone[card]
        if value == _NO_PHONE:
            return None
        return str(value) if value >= 0 else self._odd_phones[-2 - value]

    def lookup(self, bank: str, id_number: str, name: str, day: date) -> list[FoundCard]:
        """The cards of `bank` held under that ID (check digit case-insensitive) and name that a
        lookup on `day` finds (FORMAT.md), in the order of the dataset."""
        key = id_key(id_number)
        bank_index = _BANK_INDEX.get(bank)
        if key is None or bank_index is None:
            return []
        today = day.toordinal()
        found = []
        position = bisect_left(self._id_sorted, key)
        while position < len(self._id_sorted) and self._id_sorted[position] == key:
            card = self._by_id[position]
            position += 1
            if (
                self._bank[card] == bank_index
                and self._flags[card] & _LISTED
                and (self._expiry[card] == 0 or self._expiry[card] >= today)
                and self._names[self._name[card]] == name
            ):
                found.append(FoundCard(self._pan_of(card), CARD_TYPES[self._flags[card] & _CREDIT]))
        return found

    def _card_at(self, bank: str, card_number: str) -> int | None:
        bank_index = _BANK_INDEX.get(bank)
        if bank_index is None or not card_number.isascii() or not card_number.isdigit() or len(card_number) > 19:
            return None
        number = int(card_number)
        position = bisect_left(self._pan_sorted, number)
        while position < len(self._pan_sorted) and self._pan_sorted[position] == number:
            card = self._by_pan[position]
            position += 1
            if self._bank[card] == bank_index and self._pan_length[card] == len(card_number):
                return card
        return None

    def verify(self, bank: str, card_number: str, name: str, id_number: str, phone: str) -> Verification:
        card = self._card_at(bank, card_number)
        if card is None or self._flags[card] & _CLOSED:
            return Verification(holds_card=False, confirmed=False)
        reserved = self._phone_of(card)
        confirmed = (
            self._names[self._name[card]] == name
            and id_key(id_number) == self._id[card]
            and reserved is not None
            and reserved == phone
        )
        return Verification(holds_card=True, confirmed=confirmed)
