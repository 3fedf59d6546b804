"""What a report may say, on the plain functions that make it, without any server: a card
leaves bank_connector as its bank, its type and its first 4 and last 4 digits only; the report
counts each bank's debit and credit cards in the order the banks were asked and names the
ones that did not answer; it is sealed to its query."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag

from bank_connector.cards import MalformedAnswer, mask_cards
from cardcheck.numbers import luhn_check_digit
from cardcheck.runtime.keys import Keyring
from cardcheck.v1 import bank_pb2, common_pb2
from report_service.reports import (
    NOTICE,
    BankOutcome,
    BankSummary,
    MaskedCard,
    ReportContent,
    ReportVault,
    UnavailableBank,
    build_report,
)
from tests.harness.stores import MASTER_KEY


def _pan(body: str) -> str:
    return body + luhn_check_digit(body)


DEBIT_19 = _pan("622202123456789012")  # 19 digits
CREDIT_16 = _pan("625312345678901")  # 16 digits


def test_a_card_leaves_the_bank_boundary_as_4_and_4_digits():
    cards = [
        bank_pb2.BankCard(pan=DEBIT_19, card_type=common_pb2.CARD_TYPE_DEBIT),
        bank_pb2.BankCard(pan=CREDIT_16, card_type=common_pb2.CARD_TYPE_CREDIT),
    ]
    masked = mask_cards("ICBC", cards)
    assert [(c.bank_code, c.bank_name, c.card_type, c.first4, c.last4) for c in masked] == [
        ("ICBC", "中国工商银行", "DEBIT", "6222", DEBIT_19[-4:]),
        ("ICBC", "中国工商银行", "CREDIT", "6253", CREDIT_16[-4:]),
    ]
    # Nothing of the middle digits is anywhere in what leaves.
    assert DEBIT_19[4:-4] not in repr(masked) and CREDIT_16[4:-4] not in repr(masked)


@pytest.mark.parametrize(
    "card",
    [
        bank_pb2.BankCard(pan=DEBIT_19[:-1] + str((int(DEBIT_19[-1]) + 1) % 10), card_type=common_pb2.CARD_TYPE_DEBIT),
        bank_pb2.BankCard(pan=_pan("62220212345678"), card_type=common_pb2.CARD_TYPE_DEBIT),  # 15 digits
        bank_pb2.BankCard(pan=_pan("6222021234567890123"), card_type=common_pb2.CARD_TYPE_DEBIT),  # 20
        bank_pb2.BankCard(pan=DEBIT_19, card_type=common_pb2.CARD_TYPE_UNSPECIFIED),
    ],
    ids=["luhn", "15-digits", "20-digits", "no-type"],
)
def test_a_malformed_card_is_refused_without_its_number(card):
    with pytest.raises(MalformedAnswer) as caught:
        mask_cards("ICBC", [bank_pb2.BankCard(pan=CREDIT_16, card_type=common_pb2.CARD_TYPE_CREDIT), card])
    assert str(caught.value) == "ICBC answered a malformed card"


def test_the_report_counts_each_bank_s_cards_in_the_order_the_banks_were_asked():
    outcomes = [
        BankOutcome("BOC", "TIMED_OUT", detail="DEADLINE_EXCEEDED"),
        BankOutcome(
            "ICBC",
            "ANSWERED",
            (
                MaskedCard("ICBC", "DEBIT", "6222", "4321"),
                MaskedCard("ICBC", "CREDIT", "6253", "8765"),
                MaskedCard("ICBC", "DEBIT", "6212", "0001"),
            ),
        ),
        BankOutcome("CMB", "ANSWERED"),  # answered: holds none
        BankOutcome("CCB", "CIRCUIT_OPEN"),
    ]
    content = build_report(["CMB", "ICBC", "BOC", "CCB", "ABC"], outcomes)
    assert content.summary == (BankSummary("CMB", 0, 0), BankSummary("ICBC", 2, 1))
    assert [(c.bank_code, c.first4, c.last4) for c in content.cards] == [
        ("ICBC", "6222", "4321"), ("ICBC", "6253", "8765"), ("ICBC", "6212", "0001")
    ]
    assert content.unavailable_banks == (
        UnavailableBank("BOC", "TIMED_OUT: DEADLINE_EXCEEDED"),
        UnavailableBank("CCB", "CIRCUIT_OPEN"),
        UnavailableBank("ABC", "NO_ANSWER"),
    )
    assert content.notice == NOTICE


def test_a_report_opens_only_under_its_own_query():
    vault = ReportVault(Keyring(MASTER_KEY).sealer("report-kek"))
    content = build_report(["ICBC"], [BankOutcome("ICBC", "ANSWERED", (MaskedCard("ICBC", "DEBIT", "6222", "4321"),))])
    wrapped, ciphertext = vault.seal("q-1", content)
    assert vault.open("q-1", wrapped, ciphertext) == content
    assert ReportContent.from_json(content.to_json()) == content
    assert b"4321" not in ciphertext and b"6222" not in ciphertext
    with pytest.raises(InvalidTag):
        vault.open("q-2", wrapped, ciphertext)  # a row copied under another query
    other_wrapped, _ = vault.seal("q-2", content)
    with pytest.raises(InvalidTag):
        vault.open("q-1", wrapped, vault.seal("q-1", content)[1])  # every report has a key of its own
    assert other_wrapped != wrapped
