"""Change notification: who waits for a change wakes when it is committed, instead of polling.

A `ChangeHub` belongs to one database; each queue or table that others wait on is a `Channel`
of it. A writer announces a change inside its transaction (`Channel.announce(session, key)`):

- on PostgreSQL that is `pg_notify`, delivered when the transaction commits to every process
  listening, this one included. Each hub keeps one dedicated psycopg connection that LISTENs on
  its channels (named after the schema, so schemas sharing a database do not wake each other);
- on SQLite (the embedded default: one process per file) the change is delivered in-process
  once the transaction commits, to every hub of that file in the process.

Waiters take `Channel.current(key)` before they read, then wait on it: a change committed after
the read sets it. A key narrows the wakeup to one row (a watcher's query); a change announced
without a key, or a listening connection that was lost and found again (notifications may
have been missed meanwhile), wakes every waiter of the channel. Notifications are a hint, not
a log: waiters keep a slow safety poll."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref

from sqlalchemy import Connection, Engine, event, orm, text
from sqlmodel import Session

from cardcheck.runtime.database import after_commit

log = logging.getLogger(__name__)

_PENDING = "cardcheck.changes"  # session.info: what to deliver in-process after the commit
_RECONNECT_S = (0.1, 5.0)  # first and longest wait before the listener connects again
_MAX_KEY = 200  # pg_notify's payload is limited to 8000 bytes: keys are short ids anyway
_NOTIFY = text("SELECT pg_notify(current_schema() || '.' || :channel, :key)")
_LOCAL: weakref.WeakValueDictionary[tuple[str, str, int], Channel] = weakref.WeakValueDictionary()


class Channel:
    """`hub` None: a channel of this process alone (work nobody else shares)."""

    def __init__(self, name: str, hub: ChangeHub | None = None) -> None:
        self.hub = hub
        self.name = name
        self._loop = asyncio.get_running_loop()  # opened by async code: where waiters wait
        self._any = asyncio.Event()
        self._keys: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()

    def current(self, key: str | None = None) -> asyncio.Event:
        """Set by the next change to `key` (or to anything, without a key) or to everything."""
        if key is None:
            return self._any
        waiting = self._keys.get(key)
        if waiting is None:
            waiting = asyncio.Event()
            self._keys[key] = waiting
        return waiting

    def announce(self, session: Session | Connection, key: str | None = None) -> None:
        """Announces a change made in `session`'s transaction, delivered when it commits: an
        ORM session's, or a Core unit's connection (cardcheck.runtime.database.Database.run_core)."""
        if key is not None and len(key) > _MAX_KEY:
            key = None
        if self.hub is not None and self.hub.postgres:
            session.execute(_NOTIFY, {"channel": self.name, "key": key or ""})
            if self.hub.listening:
                return  # this process hears it through its own LISTEN
        if isinstance(session, Connection):
            after_commit(session, functools.partial(self._deliver_soon, key))
        else:
            _after_commit(session, self, key)

    def _deliver_soon(self, key: str | None) -> None:
        """From a writer's thread: the waiters are woken on their event loop."""
        self._loop.call_soon_threadsafe(self._deliver, key)

    def notify(self, key: str | None = None) -> None:
        """Wakes this process's waiters now (a change made outside a transaction here)."""
        self._deliver(key)

    def _deliver(self, key: str | None) -> None:
        if key is None:
            woken = list(self._keys.values())
            self._keys.clear()
        else:
            single = self._keys.pop(key, None)
            woken = [single] if single is not None else []
        woken.append(self._any)
        self._any = asyncio.Event()
        for waiting in woken:
            waiting.set()


class ChangeHub:
    """The channels of one database and, on PostgreSQL, the connection listening on them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._channels: dict[str, Channel] = {}
        self._listener: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.listening = False

    def channel(self, name: str) -> Channel:
        if self._listener is not None:
            raise RuntimeError("channels are opened before the hub starts listening")
        if name not in self._channels:
            self._channels[name] = self._local(name) if not self.postgres else Channel(name, self)
        return self._channels[name]

    def _local(self, name: str) -> Channel:
        """SQLite: one channel per file, name and event loop, whichever hub opens it."""
        loop = asyncio.get_running_loop()
        key = (str(self._engine.url), name, id(loop))
        shared = _LOCAL.get(key)
        if shared is None or shared._loop is not loop:
            shared = _LOCAL[key] = Channel(name, self)
        return shared

    async def start(self, *, connected_within_s: float = 5.0) -> None:
        """Starts listening (PostgreSQL); waits a little for the connection, never fails on it:
        until it is up, changes made here are delivered in-process and the safety polls cover
        the other replicas'."""
        if not self.postgres or self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen(), name="changes.listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), connected_within_s)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        self.listening = False

    def _dsn(self) -> str:
        return self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def _listen(self) -> None:
        import psycopg

        wait = _RECONNECT_S[0]
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn(), autocommit=True) as conn:
                    row = await (await conn.execute("SELECT current_schema()")).fetchone()
                    assert row is not None  # one row, always
                    schema = row[0]
                    names = {f"{schema}.{name}": channel for name, channel in self._channels.items()}
                    for full in names:
                        await conn.execute(f'LISTEN "{full}"')
                    self.listening = True
                    self._connected.set()
                    wait = _RECONNECT_S[0]
                    for channel in self._channels.values():
                        channel._deliver(None)  # anything may have changed while not listening
                    async for note in conn.notifies():
                        heard = names.get(note.channel)
                        if heard is not None:
                            heard._deliver(note.payload or None)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("listening for changes failed (%s); connecting again", type(error).__name__)
            self.listening = False
            await asyncio.sleep(wait)
            wait = min(wait * 2, _RECONNECT_S[1])


def _after_commit(session: Session, channel: Channel, key: str | None) -> None:
    pending = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []
    pending.append((channel, key))


# Listened to once for every session, rather than on each session that announces: a listener
# of one session costs SQLAlchemy a dispatcher of that session's own, some 30 us a transaction.
@event.listens_for(orm.Session, "after_commit")
def _committed(session: orm.Session) -> None:
    # A writer's thread: hand the wakeups to the event loop.
    for waiting, changed in session.info.pop(_PENDING, ()):
        waiting._loop.call_soon_threadsafe(waiting._deliver, changed)


@event.listens_for(orm.Session, "after_rollback")
def _rolled_back(session: orm.Session) -> None:
    session.info.pop(_PENDING, None)
