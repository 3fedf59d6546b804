"""The durable-work engine (cardcheck.runtime.work), its backoff and its change notification, on
a table of its own, on SQLite and PostgreSQL: no service, no gRPC."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa

from cardcheck.runtime.backoff import Backoff
from cardcheck.runtime.changes import ChangeHub
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.work import Lease, LeaseColumns, LeaseLost, WorkQueue, worker_name
from tests.conftest import PG_ADMIN_DSN

LEASE = timedelta(seconds=30)
METADATA = sa.MetaData()
JOBS = sa.Table(
    "t_work_jobs",
    METADATA,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("owner", sa.String(64)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("claims", sa.Integer, nullable=False, default=0),
    sa.Column("note", sa.String(32)),
)
COLUMNS = LeaseColumns(
    JOBS, key=(JOBS.c.job_id,), owner=JOBS.c.owner, expires=JOBS.c.lease_until, token=JOBS.c.claims, due=JOBS.c.due_at
)


class Rig:
    def __init__(self, db: Database, clock: ManualClock) -> None:
        self.db = db
        self.clock = clock
        self.hubs: list[ChangeHub] = []

    async def hub(self) -> ChangeHub:
        hub = ChangeHub(self.db.engine)
        self.hubs.append(hub)
        return hub

    def queue(self, channel=None) -> WorkQueue:
        return WorkQueue(COLUMNS, self.db.run, self.clock, lease=LEASE, changes=channel)

    async def add(self, count: int, *, due: datetime | None = None) -> list[str]:
        ids = [f"job-{n:03d}" for n in range(count)]
        now = due or self.clock.now()

        def add(session) -> None:
            session.execute(sa.insert(JOBS), [{"job_id": i, "due_at": now, "claims": 0} for i in ids])

        await self.db.run(add)
        return ids

    async def claim(self, queue: WorkQueue, owner: str, limit: int = 100) -> list[Lease]:
        return await self.db.run(lambda session: queue.claim(session, owner, limit))

    async def write(self, queue: WorkQueue, lease: Lease, note: str) -> None:
        """A write under a lease, fenced."""

        def write(session) -> None:
            queue.hold(session, lease)
            session.execute(sa.update(JOBS).where(JOBS.c.job_id == lease.key[0]).values(note=note))

        await self.db.run(write)

    async def notes(self) -> dict[str, str | None]:
        rows = await self.db.run(lambda session: session.execute(sa.select(JOBS.c.job_id, JOBS.c.note)).all())
        return dict(rows)


@pytest.fixture
async def rig(tmp_path, database_url):
    db = Database(make_engine(database_url, tmp_path, "work"))
    await asyncio.to_thread(METADATA.create_all, db.engine)
    rig = Rig(db, ManualClock(datetime(2026, 3, 2, 8, 0, tzinfo=UTC)))
    yield rig
    for hub in rig.hubs:
        await hub.close()
    db.dispose()


# --- claiming ------------------------------------------------------------------------------------


async def test_claims_are_exclusive_under_concurrency(rig):
    ids = await rig.add(60)
    queue = rig.queue()
    claimed: dict[str, list[str]] = {f"w{n}": [] for n in range(4)}

    async def worker(owner: str) -> None:
        while got := await rig.claim(queue, owner, 3):
            claimed[owner].extend(lease.key[0] for lease in got)

    await asyncio.gather(*(worker(owner) for owner in claimed))
    everything = [job for jobs in claimed.values() for job in jobs]
    assert sorted(everything) == ids  # each exactly once
    assert sum(1 for jobs in claimed.values() if jobs) >= 2  # they did contend
    assert await rig.claim(queue, "late") == []  # held leases are not claimable


async def test_only_due_work_is_claimed(rig):
    await rig.add(2, due=rig.clock.now() + timedelta(minutes=1))
    queue = rig.queue()
    assert await rig.claim(queue, "a") == []
    rig.clock.advance(timedelta(minutes=1))
    assert [lease.token for lease in await rig.claim(queue, "a")] == [1, 1]


async def test_an_expired_lease_is_claimed_again_by_another_owner(rig):
    [job] = await rig.add(1)
    queue = rig.queue()
    [first] = await rig.claim(queue, "a")
    assert first == Lease((job,), "a", 1)
    rig.clock.advance(LEASE - timedelta(microseconds=1))
    assert await rig.claim(queue, "b") == []  # not before it expires
    rig.clock.advance(timedelta(microseconds=1))
    [second] = await rig.claim(queue, "b")
    assert second == Lease((job,), "b", 2)


async def test_a_stale_owner_is_fenced_out(rig):
    [job] = await rig.add(1)
    queue = rig.queue()
    [stale] = await rig.claim(queue, "a")
    await rig.write(queue, stale, "a1")  # while it holds the lease
    rig.clock.advance(LEASE)
    [taken] = await rig.claim(queue, "b")
    with pytest.raises(LeaseLost):
        await rig.write(queue, stale, "a2")
    assert not await rig.db.run(lambda session: queue.put_back(session, stale, rig.clock.now()))
    assert await queue.renew([stale]) == set()
    await rig.write(queue, taken, "b1")
    assert await rig.notes() == {job: "b1"}
    # The same owner claiming again later gets a new token: its old lease stays fenced out.
    rig.clock.advance(LEASE)
    [again] = await rig.claim(queue, "a")
    assert again == Lease((job,), "a", 3)
    with pytest.raises(LeaseLost):
        await rig.write(queue, stale, "a3")
    await rig.write(queue, again, "a4")
    assert await rig.notes() == {job: "a4"}


async def test_renewing_keeps_the_lease(rig):
    ids = await rig.add(2)
    queue = rig.queue()
    leases = await rig.claim(queue, "a")
    for _ in range(3):
        rig.clock.advance(LEASE * 2 / 3)
        assert await queue.renew(leases) == {(job,) for job in ids}
    assert await rig.claim(queue, "b") == []  # long past the first expiry, still held
    rig.clock.advance(LEASE)
    assert len(await rig.claim(queue, "b")) == 2  # not renewed: gone


async def test_keep_renewed_reports_the_leases_taken_over(rig):
    ids = await rig.add(2)
    queue = rig.queue()
    leases = {lease.key: lease for lease in await rig.claim(queue, "a")}
    rig.clock.advance(LEASE)
    [taken] = await rig.claim(queue, "b", 1)  # one expired and went to b before a renewed
    lost: list = []
    reported = asyncio.Event()

    def report(key) -> None:
        lost.append(key)
        reported.set()

    renewing = asyncio.create_task(queue.keep_renewed(leases.values, report, every_s=0.01))
    try:
        await asyncio.wait_for(reported.wait(), 5)
    finally:
        renewing.cancel()
    assert lost == [taken.key]  # reported once it was taken over: the row is someone else's
    [kept] = [key for key in leases if key != taken.key]
    assert kept in {(job,) for job in ids}
    assert await queue.renew([leases[kept]]) == {kept}


async def test_work_done_meanwhile_is_not_reported_lost(rig):
    await rig.add(1)
    queue = rig.queue()
    leases = await rig.claim(queue, "a")
    await rig.db.run(lambda session: session.execute(sa.delete(JOBS)))  # finished by its holder
    lost: list = []
    renewing = asyncio.create_task(queue.keep_renewed(lambda: leases, lost.append, every_s=0.01))
    await asyncio.sleep(0.2)
    renewing.cancel()
    assert lost == []


async def test_released_work_is_claimable_at_once_and_put_back_waits_for_its_due(rig):
    await rig.add(2)
    queue = rig.queue()
    first, second = await rig.claim(queue, "a")
    assert await rig.db.run(lambda s: queue.put_back(s, first, rig.clock.now() + timedelta(seconds=10)))
    assert await queue.release("a") == 1  # only what it still held
    [again] = await rig.claim(queue, "b")
    assert again.key == second.key and again.token == 2
    assert await rig.claim(queue, "c") == []  # not before its due time
    rig.clock.advance(timedelta(seconds=10))
    [later] = await rig.claim(queue, "c")
    assert later.key == first.key


def test_worker_names_are_unique_and_fit_the_columns():
    names = {worker_name() for _ in range(100)}
    assert len(names) == 100 and all(len(name) <= 64 for name in names)


# --- backoff -------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling():
    backoff = Backoff(2.0, 30.0, random.Random(7))
    assert [backoff.ceiling(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert backoff.ceiling(10_000) == 30  # no overflow however many attempts
    for attempts in range(1, 7):
        ceiling = backoff.ceiling(attempts)
        draws = [backoff.delay(attempts).total_seconds() for _ in range(400)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.9 * ceiling and min(draws) < 0.1 * ceiling  # spread over it all
        assert len(set(draws)) > 390


def test_backoff_draws_from_its_rng_and_times_from_the_clock():
    clock = ManualClock()
    one, two = Backoff(60.0, 3600.0, random.Random(3)), Backoff(60.0, 3600.0, random.Random(3))
    assert [one.delay(n) for n in range(1, 9)] == [two.delay(n) for n in range(1, 9)]
    due = one.next_at(clock, 4)
    assert clock.now() <= due <= clock.now() + timedelta(minutes=8)
    assert one.next_at(clock, 8, until=clock.now() + timedelta(seconds=1)) <= clock.now() + timedelta(seconds=1)
    with pytest.raises(ValueError):
        Backoff(10.0, 5.0)


# --- change notification -------------------------------------------------------------------------


async def _woken_within(event: asyncio.Event, start: float, limit_s: float = 1.0) -> float:
    # Nothing here polls: only the notification sets the event. The bound is loose on purpose
    # (a loaded CI machine); how soon a change arrives is measured by `bench watchers`.
    await asyncio.wait_for(event.wait(), 2)
    elapsed = time.perf_counter() - start
    assert elapsed < limit_s, elapsed
    return elapsed


async def test_a_committed_change_wakes_its_waiter(rig):
    [job, other] = await rig.add(2)
    hub = await rig.hub()
    channel = hub.channel("jobs")
    await hub.start()
    waiting, bystander, anything = channel.current(job), channel.current(other), channel.current()

    def change(session) -> None:
        session.execute(sa.update(JOBS).where(JOBS.c.job_id == job).values(note="x"))
        channel.announce(session, job)

    start = time.perf_counter()
    await rig.db.run(change)
    await _woken_within(waiting, start)
    assert anything.is_set()
    await asyncio.sleep(0.05)
    assert not bystander.is_set()  # a change to one key wakes only its waiters
    assert not channel.current(job).is_set()  # the next wait is for the next change


async def test_a_rolled_back_change_wakes_nobody(rig):
    [job] = await rig.add(1)
    hub = await rig.hub()
    channel = hub.channel("jobs")
    await hub.start()
    waiting = channel.current(job)

    def change(session) -> None:
        channel.announce(session, job)
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await rig.db.run(change)
    await asyncio.sleep(0.2)
    assert not waiting.is_set()


async def test_releasing_work_wakes_the_workers_of_its_queue(rig):
    await rig.add(1)
    hub = await rig.hub()
    channel = hub.channel("jobs")
    await hub.start()
    queue = rig.queue(channel)
    await rig.claim(queue, "a")
    waiting = channel.current()
    start = time.perf_counter()
    assert await queue.release("a") == 1
    await _woken_within(waiting, start)


async def test_a_change_reaches_another_replica(pg_schema_url, tmp_path):
    """Two engines on one PostgreSQL database, standing for two replicas: NOTIFY carries it."""
    db = Database(make_engine(pg_schema_url, tmp_path, "work"))
    other = Database(make_engine(pg_schema_url, tmp_path, "work"))
    hubs = [ChangeHub(db.engine), ChangeHub(other.engine)]
    try:
        await asyncio.to_thread(METADATA.create_all, db.engine)
        here, there = (hub.channel("jobs") for hub in hubs)
        for hub in hubs:
            await hub.start()
            assert hub.listening
        for _ in range(5):
            waiting = there.current("job-1")
            start = time.perf_counter()
            await db.run(lambda session: here.announce(session, "job-1"))
            await _woken_within(waiting, start)
        # Another schema on the same database (another deployment) is not woken.
        elsewhere, schema = await _other_schema_hub(pg_schema_url, tmp_path)
        try:
            foreign = elsewhere.channel("jobs")
            await elsewhere.start()
            waiting = foreign.current()
            await db.run(lambda session: here.announce(session))
            await asyncio.sleep(0.2)
            assert not waiting.is_set()
        finally:
            await elsewhere.close()
            elsewhere._engine.dispose()
            _drop_schema(schema)
    finally:
        for hub in hubs:
            await hub.close()
        db.dispose()
        other.dispose()


async def _other_schema_hub(url: str, tmp_path) -> tuple[ChangeHub, str]:
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    base = url.split("?", 1)[0]
    return ChangeHub(make_engine(f"{base}?options=-csearch_path%3D{schema}", tmp_path, "work")), schema


def _drop_schema(schema: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
