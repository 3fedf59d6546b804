"""Builds and runs the gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.channels import open_channel
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import load_keyring
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.runtime.server import Registration, ServiceHost, serve_main
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider
from gateway.challenges import Challenges
from gateway.config import GatewayConfig
from gateway.downstream import BankDirectory, ReportDesk, SmsSender
from gateway.face import FaceVerifier, face_verifier_for
from gateway.flows import Gateway
from gateway.limits import Limiters, RedisStore
from gateway.payment_passwords import PaymentPasswords
from gateway.servicer import CardCheckServicer, add_to_server
from gateway.sessions import Sessions
from gateway.submissions import Submissions
from gateway.tracing import Shedding, SheddingSampler
from gateway.users import Users
from gateway.watches import FallingBackSlots, LocalWatchSlots, RedisWatchSlots, Watches, WatchSlots

SERVICE = "gateway"
MIGRATIONS = "gateway.migrations"
log = logging.getLogger(__name__)


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    config: GatewayConfig | None = None,
    face_verifier: FaceVerifier | None = None,
    limiters: Limiters | None = None,
) -> ServiceHost:
    """The gateway, not started. Raises SettingsError when it must not start (no sandbox and no
    face-verification provider, bad gateway settings). The rate limits live in this process,
    or on Redis when `settings.redis_url` is set (gateway/limits.py says what happens when
    Redis is unreachable); `limiters` overrides both. The WatchQuery slots are counted where
    the limits are (gateway/watches.py)."""
    clock = clock or SystemClock()
    config = config or GatewayConfig.from_env()
    face = face_verifier or face_verifier_for(settings)
    try:
        rates = config.limit_rates()
    except ValueError as error:
        raise SettingsError(f"gateway rate limits: {error}") from None
    if not config.sms_escalation or not 0 <= config.sms_phone_daily_reserve < config.sms_phone_daily_cap:
        raise SettingsError("gateway SMS limits: an escalation step, and 0 <= daily reserve < daily cap")
    if limiters is None:
        limiters = _limiters(settings, config, clock, rates)
    keyring = load_keyring(settings.master_key, settings.retired_master_keys, settings.data_dir)
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE, settings.data_dir)
    # Before the server's interceptors take their tracer from the provider (gateway/tracing.py).
    shedding = Shedding()
    tracer_provider.sampler = SheddingSampler(tracer_provider.sampler, shedding)

    db = Database(make_engine(settings.database_url, settings.data_dir, SERVICE))
    await asyncio.to_thread(upgrade_to_head, db.engine, MIGRATIONS, SERVICE)

    channels = {
        name: open_channel(settings.addresses[name], tracer_provider)
        for name in ("report_service", "bank_connector", "notifier")
    }
    timeout = config.downstream_timeout_s
    sessions = Sessions(db, keyring, clock, config.session_ttl)
    watches = Watches(
        _watch_slots(limiters, config, clock),
        sessions,
        clock,
        lifetime=config.watch_max_lifetime,
        session_check_s=config.watch_session_check_s,
        lease=config.watch_slot_lease,
    )
    challenges = Challenges(
        db,
        keyring,
        clock,
        daily_cap=config.sms_phone_daily_cap,
        daily_reserve=config.sms_phone_daily_reserve,
        resend_after=config.sms_resend_after,
        escalation=config.sms_escalation,
        escalation_reset=config.sms_escalation_reset,
        trust_for=config.sms_trust,
    )
    users = Users(
        db,
        keyring,
        clock,
        passwords=PaymentPasswords(
            keyring, workers=config.payment_password_workers, queue=config.payment_password_queue
        ),
        max_password_attempts=config.payment_password_max_attempts,
        password_locks=(config.payment_password_lock, config.payment_password_second_lock),
    )
    submissions = Submissions(db, keyring, clock)
    gateway = Gateway(
        settings=settings,
        config=config,
        clock=clock,
        db=db,
        users=users,
        sessions=sessions,
        challenges=challenges,
        face=face,
        banks=BankDirectory(channels["bank_connector"], timeout),
        reports=ReportDesk(channels["report_service"], timeout),
        sms=SmsSender(channels["notifier"], timeout),
        limiters=limiters,
        callers=keyring.hasher("sms-caller"),
        submissions=submissions,
        shedding=shedding,
        watches=watches,
    )

    housekeeping = asyncio.create_task(
        _housekeeping(challenges, sessions, submissions), name="gateway-housekeeping"
    )

    async def close() -> None:
        housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping
        await gateway.drain(timeout)  # sign-in codes still on their way to the notifier
        await watches.close()  # before the Redis client closes
        for channel in channels.values():
            await channel.close()
        await limiters.close()
        users.close()
        db.dispose()

    return ServiceHost(
        SERVICE,
        [
            Registration(
                add_to_server,
                CardCheckServicer(gateway, caller_header=config.caller_header),
                "cardcheck.v1.CardCheck",
            )
        ],
        settings.bind_address(SERVICE),
        tracer_provider,
        on_drain=[watches.drain],
        on_stop=[close],
    )


def _limiters(settings: Settings, config: GatewayConfig, clock: Clock, rates) -> Limiters:
    if not settings.redis_url:
        return Limiters.in_process(rates, clock)
    try:
        store = RedisStore.from_url(
            settings.redis_url, prefix=config.redis_key_prefix, timeout_s=config.redis_timeout_s
        )
    except ValueError as error:
        raise SettingsError(f"CARDCHECK_REDIS_URL: {error}") from None
    log.info("rate limits shared on redis (keys %s:rl:*)", config.redis_key_prefix)
    return Limiters.on_redis(store, rates, clock)


def _watch_slots(limiters: Limiters, config: GatewayConfig, clock: Clock) -> WatchSlots:
    """Each user's WatchQuery slots: on the limits' Redis when there is one (falling back to
    this process while it cannot be reached), else in this process."""
    local = LocalWatchSlots(config.watch_streams_per_user, clock)
    if limiters.store is None:
        return local
    shared = RedisWatchSlots(limiters.store, config.watch_streams_per_user, config.watch_slot_lease)
    return FallingBackSlots(shared, local)


async def _housekeeping(
    challenges: Challenges, sessions: Sessions, submissions: Submissions, every_s: float = 3600.0
) -> None:
    """Deletes spent challenges, expired sessions and submissions whose query can no longer have
    a report, now and then."""
    while True:
        try:
            await challenges.purge_expired()
            await sessions.purge_expired()
            await submissions.purge_expired()
        except Exception:
            log.exception("gateway housekeeping failed; trying again later")
        await asyncio.sleep(every_s)


def main() -> None:
    serve_main(SERVICE, build)
