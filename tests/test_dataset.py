"""The bank dataset: loading refuses bad files naming the line; the generator is deterministic
and gives valid records with every FORMAT.md case and a usable demo person."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import date

import pytest

from cardcheck import dataset
from cardcheck.banks import BY_CODE
from cardcheck.dataset import CardRecord, DatasetError
from cardcheck.numbers import card_number_valid, id_number_valid

GOOD_LINES = [
    '{"bank": "BOHAIB", "pan": "6228848021934372", "card_type": "DEBIT", "holder_name": "郑磊", '
    '"id_number": "110105199906138211", "id_expiry": "2036-01-24", "reserved_phone": "13560977006", '
    '"cnp_enabled": true, "status": "ACTIVE", "opened_on": "2020-12-07"}',
    '{"bank": "BJBANK", "pan": "6258164362956641", "card_type": "CREDIT", "holder_name": "孟勇", '
    '"id_number": "530102196503046174", "id_expiry": null, "reserved_phone": null, '
    '"cnp_enabled": false, "status": "CLOSED", "opened_on": "2011-05-12", "branch": "ignored"}',
]


def good(**changes: object) -> str:
    obj = json.loads(GOOD_LINES[0])
    obj.update(changes)
    return json.dumps(obj, ensure_ascii=False)


def without(field: str) -> str:
    obj = json.loads(GOOD_LINES[0])
    del obj[field]
    return json.dumps(obj)


def test_loads_good_lines_skipping_blank_ones_and_ignoring_unknown_fields(tmp_path):
    path = tmp_path / "cards.jsonl"
    path.write_text(GOOD_LINES[0] + "\n\n   \n" + GOOD_LINES[1] + "\n", encoding="utf-8")
    first, second = dataset.load(path)
    assert first == CardRecord(
        bank="BOHAIB", pan="6228848021934372", card_type="DEBIT", holder_name="郑磊",
        id_number="110105199906138211", id_expiry=date(2036, 1, 24), reserved_phone="13560977006",
        cnp_enabled=True, status="ACTIVE", opened_on=date(2020, 12, 7),
    )
    assert second.id_expiry is None and second.reserved_phone is None and not second.cnp_enabled
    assert second.status == "CLOSED"


def test_a_lower_case_x_check_digit_is_accepted():
    (record,) = dataset.iter_records([good(id_number="12010119730702747x", holder_name="龚明凯")])
    assert record.id_number == "12010119730702747x"


BROKEN = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (without("status"), "missing field(s): status"),
    (good(bank="NOSUCH"), "unknown bank code"),
    (good(pan="6228848021934373"), "pan fails the Luhn check"),
    (good(pan="622884802193437"), "16 to 19 digits"),
    (good(pan="62288480219343720000"), "16 to 19 digits"),
    (good(pan=6228848021934372), "pan must be a string"),
    (good(pan="６２２８８４８０２１９３４３７２"), "16 to 19 digits"),  # full-width digits
    (good(card_type="debit"), "card_type"),
    (good(holder_name="  "), "holder_name"),
    (good(id_number="110105199906138212"), "id_number"),
    (good(id_number="11010519990613821"), "id_number"),
    (good(id_number="110105199913328211"), "id_number"),  # no 13th month
    (good(id_expiry="2036/01/24"), "id_expiry must be YYYY-MM-DD or null"),
    (good(id_expiry="2036-02-30"), "id_expiry is not a real date"),
    (good(reserved_phone=13560977006), "reserved_phone"),
    (good(reserved_phone=""), "reserved_phone"),
    (good(cnp_enabled="true"), "cnp_enabled"),
    (good(cnp_enabled=1), "cnp_enabled"),
    (good(status="LOST"), "status"),
    (good(opened_on=None), "opened_on must be YYYY-MM-DD"),
    (GOOD_LINES[0], "already holds this pan (line 1)"),  # the same card twice at one bank
]


def load_compact(path):
    """The bank simulator's loader: validated rows straight into its compact index."""
    from bank_sim.issuers import Issuers

    return Issuers.from_file(path)


LOADERS = [pytest.param(dataset.load, id="records"), pytest.param(load_compact, id="compact")]


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(("bad_line", "message"), BROKEN)
def test_a_bad_line_refuses_the_file_naming_the_line(tmp_path, bad_line, message, load):
    path = tmp_path / "bad.jsonl"
    # Line 3 is bad after one good line and a blank one: nothing is half-loaded.
    path.write_text(f"{GOOD_LINES[0]}\n\n{bad_line}\n{GOOD_LINES[1]}\n", encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load(path)
    assert caught.value.line == 3
    assert str(caught.value).startswith("line 3: ")
    assert message in str(caught.value)


@pytest.mark.parametrize("load", LOADERS)
def test_a_line_that_is_not_utf8_is_refused_with_its_number(tmp_path, load):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD_LINES[0].encode() + b"\n" + GOOD_LINES[1].encode("gbk") + b"\n")
    with pytest.raises(DatasetError, match=r"^line 2: not UTF-8"):
        load(path)


@pytest.mark.parametrize(
    "line",
    [
        '  {"a": 1} \t',  # JSON whitespace around a value is fine (then refused for its fields)
        '{"a": 1} {"b": 2}',
        '{"a": 1',
        "",
    ],
)
def test_rows_and_records_see_the_same_json(line):
    text = GOOD_LINES[0] + "\n" + line + "\n"

    def outcome(parse):
        try:
            return [number for number, _ in parse(text.splitlines(keepends=True))]
        except DatasetError as error:
            return str(error)

    records = outcome(lambda lines: enumerate(dataset.iter_records(lines), start=1))
    rows = outcome(dataset.iter_rows)
    assert isinstance(records, str) == isinstance(rows, str)
    if isinstance(rows, str):
        assert rows == records


def test_rows_are_the_records_fields(tmp_path):
    records = dataset.generate(3, 120)
    path = tmp_path / "cards.jsonl"
    dataset.dump(records, path)
    with path.open("rb") as stream:
        rows = [row for _, row in dataset.iter_rows(stream)]
    assert rows == [dataset.row_of(record) for record in records]


def test_generator_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    dataset.dump(dataset.generate(7, 50), a)
    dataset.dump(dataset.generate(7, 50), b)
    dataset.dump(dataset.generate(8, 50), c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_every_generated_record_revalidates(tmp_path):
    records = dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)
    path = tmp_path / "cards.jsonl"
    dataset.dump(records, path)
    text = path.read_text(encoding="utf-8")
    assert "\\u" not in text  # names in clear UTF-8, not escaped
    assert dataset.load(path) == records
    for record in records:
        assert record.bank in BY_CODE
        assert card_number_valid(record.pan) and record.pan.startswith("62")
        assert id_number_valid(record.id_number)
        assert record.reserved_phone is None or (
            len(record.reserved_phone) == 11 and record.reserved_phone[:2] in {f"1{d}" for d in "3456789"}
        )
    assert len({(r.bank, r.pan) for r in records}) == len(records)
    assert {len(r.pan) for r in records} >= {16, 19}


def _people(records):
    people: dict[str, list[CardRecord]] = {}
    for record in records:
        people.setdefault(record.id_number.upper(), []).append(record)
    return people


@pytest.mark.parametrize("people", [12, dataset.DEFAULT_PEOPLE])
def test_every_format_case_is_generated(people):
    records = dataset.generate(dataset.DEFAULT_SEED, people)
    statuses = Counter(r.status for r in records)
    assert all(statuses[s] for s in ("ACTIVE", "DORMANT", "FROZEN", "CLOSED"))
    assert any(r.reserved_phone is None for r in records)
    assert any(r.id_expiry is None for r in records)
    assert any(r.id_expiry is not None and r.id_expiry < date(2026, 1, 1) for r in records)
    assert any(not r.cnp_enabled for r in records)
    assert any(r.id_number.endswith("x") for r in records)
    assert {r.card_type for r in records} == {"DEBIT", "CREDIT"}
    # A card whose reserved phone is not its holder's current phone (someone's other cards show it).
    phones = {key: Counter(r.reserved_phone for r in cards if r.reserved_phone) for key, cards in
              _people(records).items()}
    assert any(len(counter) > 1 for counter in phones.values())
    assert max(len(cards) for cards in _people(records).values()) <= 6


def test_the_demo_person_has_findable_cards_and_one_that_is_not():
    records = dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)
    person = dataset.pick_demo_person(records)
    cards = _people(records)[person.id_number]
    assert cards == [r for r in records if r.id_number.upper() == person.id_number]
    assert cards[0] is records[0]  # the demo person comes first
    findable = [
        c for c in cards
        if c.status != "CLOSED" and c.reserved_phone and c.cnp_enabled
        and (c.id_expiry is None or c.id_expiry >= date(2026, 11, 24))
    ]
    assert len(findable) >= 5
    assert len({c.bank for c in findable}) >= 4
    assert {c.card_type for c in findable} == {"DEBIT", "CREDIT"}
    assert len(findable) < len(cards)
    assert all(c.holder_name == person.name for c in cards)
    card = next(c for c in cards if c.pan == person.card_number)
    assert card.status == "ACTIVE" and card.cnp_enabled and card.reserved_phone == person.phone
    assert person.region == {"11": "CN-BJ", "22": "CN-JL", "31": "CN-SH", "44": "CN-GD", "50": "CN-CQ"}[
        person.id_number[:2]
    ]


def test_pick_demo_person_takes_the_first_among_those_with_most_cards():
    base = json.loads(GOOD_LINES[0])
    other = dict(base, id_number="12010119730702747x", holder_name="龚明凯", pan="6228848021934380")
    lines = [
        json.dumps(dict(base, reserved_phone=None)),  # 郑磊's first card cannot register
        json.dumps(other),
        json.dumps(dict(base, bank="ICBC", status="DORMANT")),
        json.dumps(dict(base, bank="CCB")),
        json.dumps(dict(other, bank="ICBC")),
    ]
    person = dataset.pick_demo_person(list(dataset.iter_records(lines)))
    # Both have two cards; 郑磊 comes first. Only the ACTIVE CCB card with a phone qualifies.
    assert person == dataset.Person("郑磊", "110105199906138211", "13560977006", "6228848021934372", "CN-BJ")
    del lines[3]
    person = dataset.pick_demo_person(list(dataset.iter_records(lines)))
    assert person.id_number == "12010119730702747X" and person.region == "CN-TJ"


def test_pick_demo_person_refuses_a_dataset_where_nobody_qualifies():
    with pytest.raises(DatasetError, match="nobody"):
        dataset.pick_demo_person(list(dataset.iter_records([GOOD_LINES[1]])))


def test_every_region_code_is_a_real_region():
    from cardcheck.runtime.settings import ALL_REGIONS

    assert sorted(dataset.PROVINCE_REGIONS.values()) == sorted(ALL_REGIONS)


def test_the_generate_command_writes_a_loadable_file(tmp_path):
    out = tmp_path / "cards.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "cardcheck.dataset", "generate", "--seed", "3", "--people", "20", "-o", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert dataset.load(out) == dataset.generate(3, 20)
