"""What the banks hold and how they answer (FORMAT.md "What a bank answers"); no gRPC here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cardcheck.dataset import CardRecord, iter_records

try:
    BANK_TIME_ZONE: timezone | ZoneInfo = ZoneInfo("Asia/Shanghai")
except ZoneInfoNotFoundError:  # no tz database in a slim image; China keeps UTC+8 all year
    BANK_TIME_ZONE = timezone(timedelta(hours=8), "CST")


def bank_day(instant: datetime) -> date:
    """The calendar day the banks are on at an instant (they keep Beijing time)."""
    return instant.astimezone(BANK_TIME_ZONE).date()


def findable(card: CardRecord, day: date) -> bool:
    """Whether a lookup on `day` finds the card: not closed (dormant and frozen cards are still
    the person's), a reserved phone, an ID not expired before that day, card-not-present on."""
    return (
        card.status != "CLOSED"
        and card.reserved_phone is not None
        and (card.id_expiry is None or card.id_expiry >= day)
        and card.cnp_enabled
    )


@dataclass(frozen=True)
class Verification:
    holds_card: bool  # this bank issued the card and it is not closed
    confirmed: bool  # and the name, ID and reserved phone all match


class Issuers:
    """The cards of every bank, indexed by (bank, ID number) and by (bank, card number)."""

    def __init__(self, records: Iterable[CardRecord]) -> None:
        self._by_person: dict[tuple[str, str], list[CardRecord]] = {}
        self._by_pan: dict[tuple[str, str], CardRecord] = {}
        for record in records:
            self._by_person.setdefault((record.bank, record.id_number.upper()), []).append(record)
            self._by_pan[(record.bank, record.pan)] = record

    @classmethod
    def from_file(cls, path: str | Path) -> Issuers:
        """Loads and validates a dataset file line by line (DatasetError, OSError)."""
        with Path(path).open("rb") as stream:
            return cls(iter_records(stream))

    def __len__(self) -> int:
        return len(self._by_pan)

    def lookup(self, bank: str, id_number: str, name: str, day: date) -> list[CardRecord]:
        """The cards of `bank` held under that ID (check digit case-insensitive) and name that a
        lookup on `day` finds, in the order of the dataset."""
        cards = self._by_person.get((bank, id_number.upper()), [])
        return [card for card in cards if card.holder_name == name and findable(card, day)]

    def verify(self, bank: str, card_number: str, name: str, id_number: str, phone: str) -> Verification:
        card = self._by_pan.get((bank, card_number))
        if card is None or card.status == "CLOSED":
            return Verification(holds_card=False, confirmed=False)
        confirmed = (
            card.holder_name == name
            and card.id_number.upper() == id_number.upper()
            and card.reserved_phone is not None
            and card.reserved_phone == phone
        )
        return Verification(holds_card=True, confirmed=confirmed)
