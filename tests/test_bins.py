"""The BIN table: the shipped one routes every generated card and every card of the sample
dataset to the bank that holds it, the generator cannot drift from it, lookup is by longest
prefix over 16 to 19 digit numbers, and a table with conflicting or malformed claims is
refused whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cardcheck import bins, dataset
from cardcheck.banks import BANK_CODES
from cardcheck.numbers import luhn_check_digit

SAMPLE = Path(__file__).parent / "data" / "sample-cards.jsonl"
TABLE = bins.load()


def card(prefix: str, length: int = 16) -> str:
    body = prefix + "3" * (length - len(prefix) - 1)
    return body + luhn_check_digit(body)


def small_claims() -> dict[str, list[str]]:
    """A table of one made-up prefix per bank, for the rules."""
    return {code: [f"99{index:02d}00"] for index, code in enumerate(BANK_CODES)}


# --- the shipped table ---------------------------------------------------------------------


def test_the_shipped_table_claims_published_bins_for_every_bank():
    assert all(TABLE.prefixes_of(code) for code in BANK_CODES)
    published = {
        "ICBC": ["622202", "622208", "621226", "621558"],
        "CMB": ["621483", "621485", "621486", "622588", "622609"],
        "CEB": ["621489", "621490", *(f"62266{d}" for d in range(7))],
        "ABC": ["622848"], "CCB": ["621700"], "BOC": ["621661"], "PSBC": ["621799"],
    }
    for bank, prefixes in published.items():
        for prefix in prefixes:
            assert TABLE.issuer_of(card(prefix)) == bank, prefix
    assert bins.default_table() is bins.default_table()  # read once


@pytest.mark.parametrize(
    ("seed", "people"), [(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE), (424242, 40), (7, 50), (31337, 1500)]
)
def test_every_generated_card_routes_to_the_bank_that_holds_it(seed, people):
    records = dataset.generate(seed, people)
    strays = [(r.bank, r.pan[:6]) for r in records if TABLE.issuer_of(r.pan) != r.bank]
    assert not strays


def test_every_sample_card_routes_to_the_bank_the_line_names():
    records = dataset.load(SAMPLE)
    assert len(records) > 100 and len({r.bank for r in records}) == len(BANK_CODES)
    strays = [(r.bank, r.pan[:6]) for r in records if TABLE.issuer_of(r.pan) != r.bank]
    assert not strays


def test_ceb_debit_cards_carry_cebs_own_bin_not_cmbs():
    records = dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)
    ceb_debit = {r.pan[:6] for r in records if r.bank == "CEB" and r.card_type == "DEBIT"}
    assert ceb_debit == {"621489"}
    assert TABLE.issuer_of(card("621483")) == "CMB"


def test_the_generator_refuses_a_bin_its_bank_does_not_claim():
    dataset.check_bins(TABLE)
    claims = {code: list(TABLE.prefixes_of(code)) for code in BANK_CODES}
    claims["CEB"].remove("621489")  # the generator's CEB debit BIN, given to nobody
    with pytest.raises(ValueError, match="gives CEB the BIN 621489, which the BIN table gives to None"):
        dataset.check_bins(bins.table_of(claims))
    claims["CMB"].append("621489")  # now to another bank
    with pytest.raises(ValueError, match="which the BIN table gives to CMB"):
        dataset.check_bins(bins.table_of(claims))


# --- lookup ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [16, 17, 18, 19])
def test_lookup_of_16_to_19_digit_numbers(length):
    claims = small_claims()
    claims["ICBC"] = ["990000", "99000012"]  # a bank may hold a longer range inside its own BIN
    claims["ABC"] = ["99010034"]  # an 8-digit BIN
    table = bins.table_of(claims)
    assert table.issuer_of(card("990000", length)) == "ICBC"
    assert table.issuer_of(card("99000012", length)) == "ICBC"
    assert table.issuer_of(card("99010034", length)) == "ABC"
    assert table.issuer_of(card("990100", length)) is None  # ABC claims only the 8 digits
    assert table.issuer_of(card("992300", length)) == BANK_CODES[23]
    assert table.issuer_of(card("621226", length)) is None
    assert TABLE.issuer_of(card("621226", length)) == "ICBC"


def test_lookup_of_numbers_shorter_than_any_prefix_finds_nobody():
    table = bins.table_of(small_claims())
    assert [table.issuer_of(number) for number in ("", "9", "9900", "99000")] == [None] * 4
    assert table.issuer_of("990000") == "ICBC"


# --- refusals --------------------------------------------------------------------------------


def test_two_banks_claiming_the_same_prefix_are_refused():
    claims = small_claims()
    claims["CMB"].append("990000")  # ICBC's
    with pytest.raises(bins.BinTableError, match="CMB: 990000 is already claimed by ICBC"):
        bins.table_of(claims)
    # The shipped table with CMB's real 621483 claimed by CEB too, as the generator once had it.
    real = {code: list(TABLE.prefixes_of(code)) for code in BANK_CODES}
    real["CEB"].append("621483")
    with pytest.raises(bins.BinTableError, match="CMB: 621483 is already claimed by CEB"):
        bins.table_of(real)


@pytest.mark.parametrize(
    ("bank", "prefix", "message"),
    [
        ("CMB", "99000", "ICBC: 990000 lies inside CMB's 99000"),  # a shorter prefix over another's
        ("CMB", "99000017", "CMB: 99000017 lies inside ICBC's 990000"),  # a longer one under another's
    ],
)
def test_a_prefix_inside_another_banks_prefix_is_refused(bank, prefix, message):
    claims = small_claims()
    claims[bank].append(prefix)
    with pytest.raises(bins.BinTableError, match=message):
        bins.table_of(claims)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["banks"].update(NOSUCH=["980000"]), "unknown bank code 'NOSUCH'"),
        (lambda t: t["banks"].pop("GDRCC"), "no prefixes for GDRCC"),
        (lambda t: t["banks"].update(ICBC=[]), "ICBC: prefixes must be a non-empty list"),
        (lambda t: t["banks"].update(ICBC="990000"), "ICBC: prefixes must be a non-empty list"),
        (lambda t: t["banks"]["ICBC"].append("62a222"), "'62a222' is not 4 to 12 digits"),
        (lambda t: t["banks"]["ICBC"].append("622"), "'622' is not 4 to 12 digits"),
        (lambda t: t["banks"]["ICBC"].append("６２２２０２"), "is not 4 to 12 digits"),  # full-width digits
        (lambda t: t["banks"]["ICBC"].append(622202), "'622202' is not 4 to 12 digits"),
        (lambda t: t["banks"]["ICBC"].append("990000"), "ICBC: 990000 is already claimed by ICBC"),
        (lambda t: t.update(format="cardcheck-bin-table/2"), "format must be"),
        (lambda t: t.update(comment="x"), "unknown key 'comment'"),
        (lambda t: t.update(banks=[]), "banks must be an object"),
    ],
)
def test_a_malformed_table_is_refused(change, message):
    table = {"format": bins.FORMAT_NAME, "banks": small_claims()}
    bins.parse(json.loads(json.dumps(table)))
    change(table)
    with pytest.raises(bins.BinTableError, match=message):
        bins.parse(table)


def test_a_table_file_is_checked_on_load(tmp_path, capsys):
    good = tmp_path / "bins.json"
    good.write_text(json.dumps({"format": bins.FORMAT_NAME, "banks": small_claims()}), encoding="utf-8")
    assert len(bins.load(good)) == len(BANK_CODES)
    assert bins.main(["check", str(good)]) == 0
    assert bins.main(["check"]) == 0 and f"{len(TABLE)} prefixes of 24 banks" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(bins.BinTableError, match="not valid JSON"):
        bins.load(bad)
    assert bins.main(["check", str(bad)]) == 2
    assert bins.main(["check", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
