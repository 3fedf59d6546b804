"""A query's lifecycle rules on QueryStore and ExecutionStore themselves, on a real SQLite file
and the ManualClock, without any server: one query in progress per user, ready (or failed)
by 24 hours after submission, a new query 7 days after the last report, the report kept 7 days."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.errors import CardCheckError
from report_service.models import QueryStatus
from report_service.queries import Query, QueryRules, Subject
from report_service.reports import ANSWERED, BankOutcome, MaskedCard
from tests.harness.stores import ReportStores, report_stores

SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)
SUBJECT = Subject("张三", "220102199003071234", "13912345678")
ICBC_DEBIT = MaskedCard("ICBC", "DEBIT", "6222", "4321")


@pytest.fixture
def stores(tmp_path):
    with report_stores(tmp_path, ManualClock()) as made:
        yield made


async def _create(stores: ReportStores, user: str = "u-1", banks=("ICBC",), key: str = "") -> Query:
    query, new = await stores.queries.create(user, SUBJECT, list(banks), "2026-11", key, {})
    assert new
    return query


async def _ready(stores: ReportStores, user: str = "u-1") -> Query:
    """A query of `user` whose one bank answers now: READY at this instant."""
    query = await _create(stores, user)
    [claim] = await stores.execution.claim("w", 1)
    recorded = await stores.execution.record(claim, [BankOutcome("ICBC", ANSWERED, (ICBC_DEBIT,))])
    assert recorded is not None and recorded.status == QueryStatus.READY
    return await stores.queries.get(user, query.query_id)


async def _refused(awaitable, reason: str) -> CardCheckError:
    with pytest.raises(CardCheckError) as caught:
        await awaitable
    assert caught.value.reason == reason
    return caught.value


# --- the rules alone -----------------------------------------------------------------------


def test_the_cooldown_ends_exactly_7_days_after_the_last_report():
    generated = ManualClock().now()
    assert QueryRules.COOLDOWN == timedelta(days=7)
    assert QueryRules.cooldown_error(None, generated) is None
    refusal = QueryRules.cooldown_error(generated, generated + 7 * DAY - SECOND)
    assert refusal is not None and refusal.reason == "COOLDOWN_ACTIVE"
    assert refusal.retry_after == SECOND
    assert refusal.metadata == {"retry_after": "2026-01-12T09:00:00Z"}
    assert QueryRules.cooldown_error(generated, generated).retry_after == 7 * DAY
    assert QueryRules.cooldown_error(generated, generated + 7 * DAY) is None


def test_banks_are_asked_once_each_in_the_order_given_and_unknown_ones_are_named():
    assert QueryRules.validate_create("u-1", SUBJECT, ["CMB", "ICBC", "CMB"], "2026-11") == ("CMB", "ICBC")
    with pytest.raises(CardCheckError) as caught:
        QueryRules.validate_create("u-1", SUBJECT, ["ICBC", "NOPE", "ZZZ"], "2026-11")
    assert caught.value.reason == "UNKNOWN_BANK"
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("bank_codes", "unknown bank NOPE"),
        ("bank_codes", "unknown bank ZZZ"),
    ]
    with pytest.raises(CardCheckError) as caught:
        QueryRules.validate_create("", Subject(" ", "", "1"), [], "")
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert [v.field for v in caught.value.violations] == [
        "user_id", "subject.name", "subject.id_number", "agreement_version", "bank_codes"
    ]


# --- on the store --------------------------------------------------------------------------


async def test_a_query_is_due_24_hours_after_submission(stores: ReportStores):
    query = await _create(stores, banks=("ICBC", "CMB", "ICBC"))
    assert query.status == QueryStatus.PENDING
    assert query.ready_by - query.submitted_at == timedelta(hours=24)
    assert (query.bank_codes, query.banks_total, query.banks_answered) == (("ICBC", "CMB"), 2, 0)
    assert query.submitted_at == stores.clock.now()


async def test_one_query_in_progress_per_user_and_a_failed_one_leaves_no_cooldown(stores: ReportStores):
    first = await _create(stores)
    await _refused(stores.queries.create("u-1", SUBJECT, ["CMB"], "2026-11", "", {}), "QUERY_IN_PROGRESS")
    await _create(stores, user="u-2")  # another user's is their own
    # Nobody answers within the 24 hours: FAILED, and a new query may start at once.
    stores.clock.advance(timedelta(hours=24))
    claim = next(c for c in await stores.execution.claim("w", 2) if c.query_id == first.query_id)
    assert claim.final and claim.missing_banks == ("ICBC",)
    recorded = await stores.execution.end_pass(claim, timedelta(hours=1))
    assert recorded is not None and recorded.status == QueryStatus.FAILED
    await _refused(stores.queries.report("u-1", first.query_id), "NOT_FOUND")
    await _create(stores)


async def test_the_same_idempotency_key_gives_back_the_query_even_while_it_runs(stores: ReportStores):
    first = await _create(stores, key="k-1")
    again, new = await stores.queries.create("u-1", SUBJECT, ["CMB"], "2026-11", "k-1", {})
    assert (again.query_id, new) == (first.query_id, False)
    other = await _create(stores, user="u-2", key="k-1")  # keys are per user
    assert other.query_id != first.query_id


async def test_at_24_hours_and_not_a_second_before_the_report_is_made_of_what_answered(stores: ReportStores):
    query = await _create(stores, banks=("ICBC", "CMB"))
    [claim] = await stores.execution.claim("w", 1)
    assert claim.missing_banks == ("ICBC", "CMB")
    assert await stores.execution.record(claim, [BankOutcome("ICBC", ANSWERED, (ICBC_DEBIT,))]) is None
    stores.clock.advance(timedelta(hours=24) - SECOND)
    # A pass that ends before ready_by puts the query back, due no later than ready_by.
    assert await stores.execution.end_pass(claim, timedelta(hours=6)) is None
    assert (await stores.queries.get("u-1", query.query_id)).status == QueryStatus.PENDING
    assert await stores.execution.claim("w", 1) == []
    stores.clock.advance(SECOND)
    [last] = await stores.execution.claim("w", 1)
    assert last.final and last.missing_banks == ("CMB",)
    recorded = await stores.execution.end_pass(last, timedelta(hours=6))
    assert recorded is not None and recorded.status == QueryStatus.READY
    report = await stores.queries.report("u-1", query.query_id)
    assert [(s.bank_code, s.debit_count, s.credit_count) for s in report.content.summary] == [("ICBC", 1, 0)]
    assert [(u.bank_code, u.reason) for u in report.content.unavailable_banks] == [("CMB", "NO_ANSWER")]
    assert report.generated_at == query.ready_by


async def test_a_new_query_is_refused_until_exactly_7_days_after_the_report(stores: ReportStores):
    ready = await _ready(stores)
    assert ready.ready_at == stores.clock.now()
    stores.clock.advance(7 * DAY - SECOND)
    refusal = await _refused(stores.queries.create("u-1", SUBJECT, ["ICBC"], "2026-11", "", {}), "COOLDOWN_ACTIVE")
    assert refusal.retry_after == SECOND
    await _create(stores, user="u-2")  # the cooldown is the user's own
    stores.clock.advance(SECOND)
    await _create(stores)


async def test_the_cooldown_outlives_the_report(tmp_path):
    # Counted from the report's generation, whether it is still READY or swept (EXPIRED).
    kept = timedelta(days=3)
    with report_stores(tmp_path, ManualClock(), retention=kept) as stores:
        ready = await _ready(stores)
        stores.clock.advance(kept)
        assert await stores.queries.sweep() == [ready.query_id]
        assert (await stores.queries.get("u-1", ready.query_id)).status == QueryStatus.EXPIRED
        stores.clock.advance(7 * DAY - kept - SECOND)
        refusal = await _refused(
            stores.queries.create("u-1", SUBJECT, ["ICBC"], "2026-11", "", {}), "COOLDOWN_ACTIVE"
        )
        assert refusal.retry_after == SECOND
        stores.clock.advance(SECOND)
        await _create(stores)


async def test_the_report_is_kept_7_days_then_deleted_by_the_sweep(stores: ReportStores):
    ready = await _ready(stores)
    assert ready.expires_at == ready.ready_at + 7 * DAY
    await _refused(stores.queries.report("u-2", ready.query_id), "NOT_FOUND")  # only its owner's
    stores.clock.advance(7 * DAY - timedelta(microseconds=1))
    report = await stores.queries.report("u-1", ready.query_id)
    assert report.content.cards == (ICBC_DEBIT,) and report.expires_at == ready.expires_at
    assert await stores.queries.sweep() == []
    stores.clock.advance(timedelta(microseconds=1))
    # Past its expiry it is refused at once, swept or not.
    await _refused(stores.queries.report("u-1", ready.query_id), "REPORT_EXPIRED")
    assert await stores.queries.sweep() == [ready.query_id]
    assert await stores.queries.sweep() == []
    query, outcomes = await stores.queries.snapshot("u-1", ready.query_id)
    assert query.status == QueryStatus.EXPIRED and [o.cards for o in outcomes] == [()]  # the cards are erased too
    await _refused(stores.queries.report("u-1", ready.query_id), "REPORT_EXPIRED")


async def test_a_pending_query_has_no_report_yet(stores: ReportStores):
    query = await _create(stores)
    await _refused(stores.queries.report("u-1", query.query_id), "REPORT_NOT_READY")
