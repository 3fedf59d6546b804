"""The BIN table (`cardcheck-bin-table/1`): which of the 24 banks issued a card, told by the
card number's first digits, its BIN (ISO/IEC 7812 issuer identification number). The
real-name check asks that bank alone: a full card number, name, ID number and phone go only to
the bank that issued the card (PCI DSS need-to-know, PIPL's minimum necessary).

The table is data, `cardcheck/bins.json`, shipped in the package (and so in the image):

    {
      "format": "cardcheck-bin-table/1",
      "banks": {
        "ICBC": ["621226", "622202", ...],
        ...
      }
    }

- `format` is exactly `cardcheck-bin-table/1`; no other key at the top.
- `banks` names each of the 24 bank codes of `cardcheck/banks.py` (docs/api.md's list) once, no
  other code, each with a non-empty list of the prefixes it claims.
- A prefix is a string of 4 to 12 ASCII digits: a 6-digit UnionPay BIN (`62xxxx`, the older
  `60xxxx`), an 8-digit one, or a longer range inside a BIN that a bank has for itself.
- No prefix is listed twice, and no bank's prefix is a prefix of another bank's: then each card
  number has at most one issuer, the bank of its longest matching prefix. A table that breaks a
  rule is refused whole (`BinTableError`, naming the bank and prefix).

Operators update `cardcheck/bins.json` when a bank announces a new BIN or gives one up, and
ship it as any other change: `python -m cardcheck.bins check [FILE]` validates a table, and the
tests check that every card of the generated dataset and of the sample dataset routes to the
bank that holds it (the generator's BINs are checked against this table at every run). A
card whose BIN no bank claims is refused without asking any bank (bank_connector,
`unknown_issuer`). The table lists UnionPay BINs only: a bank's Visa, Mastercard or JCB
co-branded cards are refused until their BINs are added.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from cardcheck.banks import BANK_CODES, BY_CODE

FORMAT_NAME = "cardcheck-bin-table/1"
MIN_PREFIX, MAX_PREFIX = 4, 12


class BinTableError(ValueError):
    """A table that breaks a rule of the format; the message names what is wrong."""


class BinTable:
    """Prefix -> issuing bank, looked up by longest prefix."""

    def __init__(self, issuers: Mapping[str, str]) -> None:
        self._issuers = dict(issuers)
        self._lengths = sorted({len(prefix) for prefix in self._issuers}, reverse=True)

    def issuer_of(self, card_number: str) -> str | None:
        """The code of the bank whose prefix the number starts with (the longest that
        matches), or None when no bank claims it."""
        for length in self._lengths:
            bank = self._issuers.get(card_number[:length])
            if bank is not None:
                return bank
        return None

    def prefixes_of(self, bank_code: str) -> tuple[str, ...]:
        return tuple(sorted(prefix for prefix, bank in self._issuers.items() if bank == bank_code))

    def __len__(self) -> int:
        return len(self._issuers)


def parse(obj: object) -> BinTable:
    """A decoded table, checked against every rule of the format."""
    if not isinstance(obj, dict):
        raise BinTableError("a BIN table must be a JSON object")
    unknown = sorted(set(obj) - {"format", "banks"})
    if unknown:
        raise BinTableError(f"unknown key {unknown[0]!r} (a table has only `format` and `banks`)")
    if obj.get("format") != FORMAT_NAME:
        raise BinTableError(f"format must be {FORMAT_NAME!r}")
    banks = obj.get("banks")
    if not isinstance(banks, dict):
        raise BinTableError("banks must be an object of bank code to prefixes")
    for code in banks:
        if code not in BY_CODE:
            raise BinTableError(f"unknown bank code {code[:32]!r}")
    missing = [code for code in BANK_CODES if code not in banks]
    if missing:
        raise BinTableError(f"no prefixes for {', '.join(missing)}")
    issuers: dict[str, str] = {}
    for code, prefixes in banks.items():
        if not isinstance(prefixes, list) or not prefixes:
            raise BinTableError(f"{code}: prefixes must be a non-empty list")
        for prefix in prefixes:
            if (
                not isinstance(prefix, str) or not prefix.isascii() or not prefix.isdigit()
                or not MIN_PREFIX <= len(prefix) <= MAX_PREFIX
            ):
                raise BinTableError(f"{code}: {str(prefix)[:32]!r} is not {MIN_PREFIX} to {MAX_PREFIX} digits")
            if prefix in issuers:
                raise BinTableError(f"{code}: {prefix} is already claimed by {issuers[prefix]}")
            issuers[prefix] = code
    _refuse_overlaps(issuers)
    return BinTable(issuers)


def _refuse_overlaps(issuers: Mapping[str, str]) -> None:
    """One bank's prefix at the start of another bank's would give a number two issuers."""
    lengths = sorted({len(prefix) for prefix in issuers})
    for prefix, bank in issuers.items():
        for length in lengths:
            if length >= len(prefix):
                break
            other = issuers.get(prefix[:length])
            if other is not None and other != bank:
                raise BinTableError(f"{bank}: {prefix} lies inside {other}'s {prefix[:length]}")


def load(path: str | Path | None = None) -> BinTable:
    """The table at `path`, else the one shipped in the package. OSError when unreadable,
    BinTableError when it breaks a rule."""
    if path is None:
        text = resources.files("cardcheck").joinpath("bins.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise BinTableError(f"not valid JSON ({error.msg}, line {error.lineno})") from None
    return parse(obj)


@functools.cache
def default_table() -> BinTable:
    """The shipped table, read once."""
    return load()


def table_of(claims: Mapping[str, Iterable[str]]) -> BinTable:
    """A table from bank code -> prefixes, under the same rules as a file."""
    return parse({"format": FORMAT_NAME, "banks": {code: list(prefixes) for code, prefixes in claims.items()}})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cardcheck.bins", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a BIN table (the shipped one by default)")
    check.add_argument("path", type=Path, nargs="?")
    args = parser.parse_args(argv)
    name = args.path or "cardcheck/bins.json"
    try:
        table = load(args.path)
    except (BinTableError, OSError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    print(f"{name}: {len(table)} prefixes of {len(BANK_CODES)} banks, valid {FORMAT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
