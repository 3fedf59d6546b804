"""What a report says, built from the banks' outcomes, and how it is kept: sealed with a fresh
AES-256-GCM data key of its own, that key wrapped by the "report-kek" subkey. Deleting the row
(wrapped key and ciphertext) is what deleting the report means."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cardcheck.banks import BY_CODE
from cardcheck.runtime.keys import Sealer

NOTICE = (
    "如发现非本人办理或不再使用的银行卡，请及时联系发卡银行核实或注销。"
    "请勿出租、出借、出售银行卡，以免被不法分子用于电信网络诈骗等违法犯罪活动。"
)
ANSWERED = "ANSWERED"
_NONCE = 12
_CONTENT_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps's, made once


def bank_display_name(code: str) -> str:
    return BY_CODE[code].name if code in BY_CODE else code


@dataclass(frozen=True)
class MaskedCard:
    bank_code: str
    card_type: str  # DEBIT or CREDIT
    first4: str
    last4: str

    @property
    def bank_name(self) -> str:
        return bank_display_name(self.bank_code)


@dataclass(frozen=True)
class BankOutcome:
    bank_code: str
    kind: str  # ANSWERED, TIMED_OUT, ERROR, CIRCUIT_OPEN
    cards: tuple[MaskedCard, ...] = ()
    detail: str = ""
    attempts: int = 0
    latency_ms: int = 0


@dataclass(frozen=True)
class BankSummary:
    bank_code: str
    debit_count: int
    credit_count: int


@dataclass(frozen=True)
class UnavailableBank:
    bank_code: str
    reason: str


@dataclass(frozen=True)
class ReportContent:
    summary: tuple[BankSummary, ...]
    cards: tuple[MaskedCard, ...]
    unavailable_banks: tuple[UnavailableBank, ...]
    notice: str = NOTICE

    def to_json(self) -> bytes:
        # What dataclasses.asdict gives, field by field: asdict deep-copies every value through
        # its generic walk, several times the cost of the encoding itself.
        return _CONTENT_ENCODER.encode(
            {
                "summary": [
                    {"bank_code": row.bank_code, "debit_count": row.debit_count, "credit_count": row.credit_count}
                    for row in self.summary
                ],
                "cards": [
                    {"bank_code": c.bank_code, "card_type": c.card_type, "first4": c.first4, "last4": c.last4}
                    for c in self.cards
                ],
                "unavailable_banks": [{"bank_code": row.bank_code, "reason": row.reason} for row in self.unavailable_banks],
                "notice": self.notice,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ReportContent:
        data = json.loads(raw)
        return cls(
            summary=tuple(BankSummary(**row) for row in data["summary"]),
            cards=tuple(MaskedCard(**card) for card in data["cards"]),
            unavailable_banks=tuple(UnavailableBank(**row) for row in data["unavailable_banks"]),
            notice=data["notice"],
        )


@dataclass(frozen=True)
class Report:
    query_id: str
    generated_at: datetime
    expires_at: datetime
    content: ReportContent


def unavailable_reason(outcome: BankOutcome) -> str:
    return f"{outcome.kind}: {outcome.detail}" if outcome.detail else outcome.kind


def build_report(bank_codes: Sequence[str], outcomes: Sequence[BankOutcome]) -> ReportContent:
    """One summary row per bank that answered (zero rows too), in the order the banks were asked."""
    by_bank = {outcome.bank_code: outcome for outcome in outcomes}
    summary: list[BankSummary] = []
    cards: list[MaskedCard] = []
    unavailable: list[UnavailableBank] = []
    for code in bank_codes:
        outcome = by_bank.get(code)
        if outcome is None:
            unavailable.append(UnavailableBank(code, "NO_ANSWER"))
        elif outcome.kind == ANSWERED:
            debit = sum(1 for card in outcome.cards if card.card_type == "DEBIT")
            credit = sum(1 for card in outcome.cards if card.card_type == "CREDIT")
            summary.append(BankSummary(code, debit, credit))
            cards.extend(outcome.cards)
        else:
            unavailable.append(UnavailableBank(code, unavailable_reason(outcome)))
    return ReportContent(tuple(summary), tuple(cards), tuple(unavailable))


class ReportVault:
    """Seals a report under a fresh data key; the key is wrapped by the key-encryption key.
    Both are bound to the query_id, so a row copied under another query does not open."""

    def __init__(self, kek: Sealer) -> None:
        self._kek = kek

    def seal(self, query_id: str, content: ReportContent) -> tuple[bytes, bytes]:
        data_key = AESGCM.generate_key(256)
        nonce = os.urandom(_NONCE)
        ciphertext = nonce + AESGCM(data_key).encrypt(nonce, content.to_json(), query_id.encode())
        return self._kek.seal(data_key, query_id.encode()), ciphertext

    def open(self, query_id: str, wrapped_key: bytes, ciphertext: bytes) -> ReportContent:
        data_key = self._kek.open(wrapped_key, query_id.encode())
        plain = AESGCM(data_key).decrypt(ciphertext[:_NONCE], ciphertext[_NONCE:], query_id.encode())
        return ReportContent.from_json(plain)
