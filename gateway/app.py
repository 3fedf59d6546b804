"""Builds and runs the gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from cardcheck.runtime.channels import open_channel
from cardcheck.runtime.clock import Clock, SystemClock
from cardcheck.runtime.database import Database, make_engine
from cardcheck.runtime.keys import load_keyring
from cardcheck.runtime.metrics import ServiceMetrics
from cardcheck.runtime.migrations import upgrade_to_head
from cardcheck.runtime.production import require_ready
from cardcheck.runtime.readiness import database, redis_server
from cardcheck.runtime.security import mesh_tls, server_security
from cardcheck.runtime.server import Registration, RequestBounds, ServiceHost, serve_main
from cardcheck.runtime.settings import Settings, SettingsError
from cardcheck.runtime.telemetry import make_tracer_provider, trace_engine, trace_redis
from gateway.challenges import Challenges
from gateway.config import GatewayConfig
from gateway.downstream import BankDirectory, ReportDesk, SmsSender
from gateway.face import FaceVerifier, face_provider_name, face_setup_problems, face_verifier_for
from gateway.face_tokens import SpentFaceTokens
from gateway.flows import Gateway
from gateway.limits import Limiters, RedisStore
from gateway.metrics import GatewayState, counted
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

KIB, MIB = 1024, 1024 * 1024
# The public edge's bounds (cardcheck/runtime/server.py says what a caller past one hears).
# Requests: the largest a client can send that validation would accept is a SubmitQuery of
# about 20 KB (a face token of 4096 characters is at most 16 KiB of UTF-8, 96 bank codes of 32
# characters 3.3 KB, the other fields 0.3 KB); Register is 0.3 KB, every other request less.
# Twice that leaves room for fields to come. At grpc's default (4 MiB), parsing three SubmitQuery
# of 1.3 million junk bank codes raised the process's peak memory by ~85 MB; refused, by ~6 MB
# (`python -m bench oversized`).
MAX_REQUEST_BYTES = 32 * KIB
# Answers: a Report of 24 banks is some 50 bytes a card; 4 MiB, the most a client with grpc's
# defaults accepts, is far beyond anything a person holds.
MAX_RESPONSE_BYTES = 4 * MIB
# Calls and streams under way in one replica: every WatchQuery holds one (and one to
# report_service) for as long as its query runs. Beyond it, RESOURCE_EXHAUSTED at once.
MAX_CONCURRENT_RPCS = 2000
# One HTTP/2 connection (one client, or a proxy in front: Envoy opens another connection
# past it) holds at most this many streams; HTTP/2 asks for no fewer than 100.
MAX_STREAMS_PER_CONNECTION = 128
# Headers: `authorization: Bearer` with a token of at most 256 characters, x-forwarded-for,
# traceparent and grpc's own ~500 bytes come to about 1.5 KB.
MAX_METADATA_BYTES = 8 * KIB
BOUNDS = RequestBounds(
    max_receive_bytes=MAX_REQUEST_BYTES,
    max_send_bytes=MAX_RESPONSE_BYTES,
    max_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    max_streams_per_connection=MAX_STREAMS_PER_CONNECTION,
    max_metadata_bytes=MAX_METADATA_BYTES,
)
# What the gateway takes from each internal service: report_service answers with Reports (masked
# cards) and progress (the outcomes new since its last message), as large as the edge may send; the others
# with a bank list or a verdict, a few KB at most.
MAX_ANSWER_BYTES = {"report_service": MAX_RESPONSE_BYTES, "bank_connector": 64 * KIB, "notifier": 64 * KIB}


@dataclass(frozen=True)
class GatewayParts:
    """The host plus the flows behind its servicer, which tests wait on (`drain`: the sign-in
    codes still on their way to the notifier, which no RPC tells)."""

    host: ServiceHost
    gateway: Gateway


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    config: GatewayConfig | None = None,
    face_verifier: FaceVerifier | None = None,
    limiters: Limiters | None = None,
) -> ServiceHost:
    """The gateway, not started (`build_parts` says more)."""
    parts = await build_parts(
        settings,
        clock=clock,
        tracer_provider=tracer_provider,
        config=config,
        face_verifier=face_verifier,
        limiters=limiters,
    )
    return parts.host


async def build_parts(
    settings: Settings,
    *,
    clock: Clock | None = None,
    tracer_provider: TracerProvider | None = None,
    config: GatewayConfig | None = None,
    face_verifier: FaceVerifier | None = None,
    limiters: Limiters | None = None,
) -> GatewayParts:
    """The gateway, not started. Raises SettingsError when it must not start (no sandbox and no
    face-verification provider, bad gateway settings). The rate limits live in this process,
    or on Redis when `settings.redis_url` is set (gateway/limits.py says what happens when
    Redis is unreachable); `limiters` overrides both. The WatchQuery slots are counted where
    the limits are (gateway/watches.py)."""
    clock = clock or SystemClock()
    config = config or GatewayConfig.from_env()
    if face_verifier is None:
        face_provider_name(settings, config)  # a provider that cannot run stops the start first
    try:
        rates = config.limit_rates()
    except ValueError as error:
        raise SettingsError(f"gateway rate limits: {error}") from None
    if not config.sms_escalation or not 0 <= config.sms_phone_daily_reserve < config.sms_phone_daily_cap:
        raise SettingsError("gateway SMS limits: an escalation step, and 0 <= daily reserve < daily cap")
    if limiters is None:
        limiters = _limiters(settings, config, clock, rates)
    metrics = ServiceMetrics(SERVICE, settings.metrics_address(SERVICE))
    limiters = counted(limiters)
    keyring = load_keyring(settings.master_key, settings.retired_master_keys, settings.data_dir)
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE, settings.data_dir)
    # Before the server's interceptors take their tracer from the provider (gateway/tracing.py).
    shedding = Shedding()
    tracer_provider.sampler = SheddingSampler(tracer_provider.sampler, shedding)

    db = Database(make_engine(settings.database_url, settings.data_dir, SERVICE))
    await asyncio.to_thread(upgrade_to_head, db.engine, MIGRATIONS, SERVICE)
    trace_engine(db.engine, tracer_provider)
    # Not ready while the database, or the limits' Redis, does not answer.
    dependencies = [database(db.engine)]
    if limiters.store is not None:
        trace_redis(limiters.store.client, tracer_provider)
        dependencies.append(redis_server(limiters.store.client))

    metrics.register(GatewayState(db.engine, clock, shedding, limiters))
    tls = mesh_tls(settings, SERVICE)
    channels = {
        name: open_channel(
            settings.addresses[name], tracer_provider, max_receive_bytes=MAX_ANSWER_BYTES[name], metrics=metrics,
            tls=tls,
        )
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
    spent_face_tokens = SpentFaceTokens(db, keyring, clock, config.face_fresh_for)
    face = face_verifier or face_verifier_for(settings, config, spent=spent_face_tokens, clock=clock)
    gateway = Gateway(
        settings=settings,
        config=config,
        clock=clock,
        db=db,
        users=users,
        sessions=sessions,
        challenges=challenges,
        face=face,
        banks=BankDirectory(channels["bank_connector"], timeout, clock),
        reports=ReportDesk(channels["report_service"], timeout),
        sms=SmsSender(channels["notifier"], timeout),
        limiters=limiters,
        callers=keyring.hasher("sms-caller"),
        submissions=submissions,
        shedding=shedding,
        watches=watches,
    )

    housekeeping = asyncio.create_task(
        _housekeeping(challenges, sessions, submissions, spent_face_tokens), name="gateway-housekeeping"
    )

    async def close() -> None:
        housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping
        await gateway.drain(timeout)  # sign-in codes still on their way to the notifier
        await watches.close()  # before the Redis client closes
        if face_verifier is None:
            await face.close()  # the vendor's HTTP connections
        for channel in channels.values():
            await channel.close()
        await limiters.close()
        users.close()
        db.dispose()

    host = ServiceHost(
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
        bounds=BOUNDS.configured(settings, SERVICE),
        metrics=metrics,
        dependencies=dependencies,
        readiness_every_s=settings.readiness_every_s,
        security=server_security(settings, SERVICE),
    )
    return GatewayParts(host, gateway)


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
    challenges: Challenges,
    sessions: Sessions,
    submissions: Submissions,
    face_tokens: SpentFaceTokens,
    every_s: float = 3600.0,
) -> None:
    """Deletes spent challenges, expired sessions, submissions whose query can no longer have a
    report and used face tokens that could no longer be fresh, now and then."""
    while True:
        try:
            await challenges.purge_expired()
            await sessions.purge_expired()
            await submissions.purge_expired()
            await face_tokens.purge_expired()
        except Exception:
            log.exception("gateway housekeeping failed; trying again later")
        await asyncio.sleep(every_s)


async def _build_from_env(settings: Settings) -> ServiceHost:
    config = GatewayConfig.from_env()
    require_ready(settings, SERVICE, face_setup_problems(settings, config))
    return await build(settings, config=config)


def main() -> None:
    serve_main(SERVICE, _build_from_env)
