"""The boundary where a bank's card numbers stop: full numbers in, masked cards out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cardcheck.banks import bank_name
from cardcheck.numbers import card_number_valid
from cardcheck.v1 import bank_pb2, common_pb2

CARD_TYPE_NAMES = {common_pb2.CARD_TYPE_DEBIT: "DEBIT", common_pb2.CARD_TYPE_CREDIT: "CREDIT"}


class MalformedAnswer(ValueError):
    """A bank answered with something that is not a card (no number of it is kept)."""


@dataclass(frozen=True)
class MaskedCard:
    """A card as it may leave bank_connector: the bank, the type and 4 + 4 digits."""

    bank_code: str
    bank_name: str
    card_type: str  # DEBIT or CREDIT
    first4: str
    last4: str


def mask_cards(bank_code: str, cards: Iterable[bank_pb2.BankCard]) -> tuple[MaskedCard, ...]:
    """The only place that reads a full card number from a bank's answer."""
    masked = []
    for card in cards:
        if not card_number_valid(card.pan) or card.card_type not in CARD_TYPE_NAMES:
            raise MalformedAnswer(f"{bank_code} answered a malformed card")
        masked.append(
            MaskedCard(bank_code, bank_name(bank_code), CARD_TYPE_NAMES[card.card_type], card.pan[:4], card.pan[-4:])
        )
    return tuple(masked)
