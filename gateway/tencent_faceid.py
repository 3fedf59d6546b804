"""Tencent Cloud FaceID (慧眼人脸核身) through the vendor's SDK, on its asyncio client (httpx):
DetectAuth opens a check bound to the user's name and ID number under the RuleId; the app runs
the liveness check with its BizToken; GetDetectInfoEnhanced tells the result.

A result proves the user when it passed (ErrCode 0), names this user's name and ID number (as
the account's seal holds them: compared in memory, never logged or stored), is fresh (its last
liveness attempt within CARDCHECK_FACE_FRESH_S of the gateway's clock) and its BizToken was not
used before (gateway/face_tokens.py, over every replica). Only the text part of the result is
asked for (InfoType 1): no photo or video crosses the wire.

Each call is bounded by CARDCHECK_TENCENT_FACEID_TIMEOUT_S. A vendor out of reach, slow, or
answering an internal or rate error is SERVICE_UNAVAILABLE with a RetryInfo; an error that
waiting does not mend (credentials, RuleId) is SERVICE_UNAVAILABLE without one, logged with its
code for the operator. The SDK logs whole requests (name, ID number) at DEBUG: its logger is
held at WARNING whatever CARDCHECK_LOG_LEVEL says."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import httpx
from tencentcloud.common.credential import Credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.faceid.v20180301 import faceid_client_async, models

from cardcheck.runtime.clock import Clock
from cardcheck.runtime.errors import CardCheckError, Reason
from gateway.config import GatewayConfig, faceid_endpoint
from gateway.face import SANDBOX_PREFIX, FaceCheck, FaceRefusal, FaceSubject
from gateway.face_tokens import SpentFaceTokens

log = logging.getLogger(__name__)
SDK_LOGGER = "tencentcloud_sdk_common"
BIZ_TOKEN_LIFETIME = timedelta(seconds=7200)  # the vendor's: the check must be done within it
CLOCK_SKEW = timedelta(minutes=1)  # a check stamped a little after the gateway's now still counts
RETRY_AFTER = timedelta(seconds=2)
# Errors of the caller's token, not of the vendor or the setup.
TOKEN_ERRORS = ("InvalidParameterValue.BizTokenExpired", "InvalidParameterValue.BizTokenIllegal")
# Errors that waiting mends.
TRANSIENT_PREFIXES = ("InternalError", "RequestLimitExceeded", "ServerNetworkError", "ResourceUnavailable")
T = TypeVar("T")


@dataclass(frozen=True)
class TencentFaceOptions:
    secret_id: str = field(repr=False)
    secret_key: str = field(repr=False)
    rule_id: str
    scheme: str = "https"
    host: str = "faceid.tencentcloudapi.com"
    region: str = ""
    redirect_url: str | None = None
    timeout_s: float = 5.0
    fresh_for: timedelta = timedelta(minutes=10)

    @classmethod
    def from_config(cls, config: GatewayConfig) -> TencentFaceOptions:
        endpoint = faceid_endpoint(config.tencent_faceid_endpoint)
        assert endpoint is not None  # the config's validator checked it
        return cls(
            secret_id=config.tencent_secret_id or "",
            secret_key=config.tencent_secret_key or "",
            rule_id=config.tencent_faceid_rule_id or "",
            scheme=endpoint[0],
            host=endpoint[1],
            region=config.tencent_region or "",
            redirect_url=config.tencent_faceid_redirect_url,
            timeout_s=config.tencent_faceid_timeout_s,
            fresh_for=config.face_fresh_for,
        )


def _unavailable(message: str, *, transient: bool = True) -> CardCheckError:
    return CardCheckError(
        Reason.SERVICE_UNAVAILABLE,
        message,
        metadata={"factor": "face"},
        retry_after=RETRY_AFTER if transient else None,
    )


def _same(a: str | None, b: str) -> bool:
    return hmac.compare_digest((a or "").strip().upper().encode(), b.strip().upper().encode())


def checked_at(text: models.DetectInfoText) -> datetime | None:
    """When the check's last liveness attempt ran: the latest ReqTime of its LivenessDetail
    (Unix time, in milliseconds or seconds)."""
    stamps = []
    for detail in text.LivenessDetail or ():
        try:
            stamp = int(str(detail.ReqTime or "").strip())
        except ValueError:
            continue
        stamps.append(stamp / 1000 if stamp > 100_000_000_000 else stamp)
    return datetime.fromtimestamp(max(stamps), UTC) if stamps else None


class TencentFaceVerifier:
    def __init__(self, options: TencentFaceOptions, spent: SpentFaceTokens, clock: Clock) -> None:
        self._options = options
        self._spent = spent
        self._clock = clock
        self._client: faceid_client_async.FaceidClient | None = None

    def __repr__(self) -> str:
        return f"TencentFaceVerifier(host={self._options.host!r}, rule_id={self._options.rule_id!r})"

    def _faceid(self) -> faceid_client_async.FaceidClient:
        # Made on first use, inside the event loop whose httpx client it holds.
        if self._client is None:
            logging.getLogger(SDK_LOGGER).setLevel(logging.WARNING)
            options = self._options
            http = HttpProfile(
                protocol=options.scheme, endpoint=options.host, reqTimeout=options.timeout_s, keepAlive=True
            )
            self._client = faceid_client_async.FaceidClient(
                Credential(options.secret_id, options.secret_key),
                options.region,
                ClientProfile(httpProfile=http, language="en-US"),
            )
        return self._client

    async def _call(self, action: str, call: Callable[[faceid_client_async.FaceidClient], Awaitable[T]]) -> T:
        # The client is made before the vendor's time starts: making it (the SDK's set-up, an
        # httpx client) took 140 ms on an idle machine, and more than the timeout on a busy one.
        client = self._faceid()
        try:
            async with asyncio.timeout(self._options.timeout_s):
                return await call(client)
        except TimeoutError:
            log.warning("FaceID %s took longer than %.1f s", action, self._options.timeout_s)
            raise _unavailable("the face-verification provider did not answer in time") from None
        except httpx.HTTPError as error:
            log.warning("FaceID %s unreachable: %s", action, type(error).__name__)
            raise _unavailable("the face-verification provider is unreachable") from None
        except TencentCloudSDKException as error:
            code = error.get_code() or ""
            if code in TOKEN_ERRORS:
                raise
            transient = code.startswith(TRANSIENT_PREFIXES)
            # The code and request id only: the vendor's message may echo what was sent.
            log.log(
                logging.WARNING if transient else logging.ERROR,
                "FaceID %s refused: %s (request %s)", action, code, error.get_request_id(),
            )
            raise _unavailable(f"the face-verification provider answered {code}", transient=transient) from None

    async def start(self, subject: FaceSubject) -> FaceCheck:
        request = models.DetectAuthRequest()
        request.RuleId = self._options.rule_id
        request.IdCard = subject.id_number.upper()
        request.Name = subject.name
        if self._options.redirect_url:
            request.RedirectUrl = self._options.redirect_url
        started = self._clock.now()
        response = await self._call("DetectAuth", lambda client: client.DetectAuth(request))
        if not response.BizToken:
            raise _unavailable("the face-verification provider answered no BizToken")
        return FaceCheck(response.BizToken, response.Url or "", started + BIZ_TOKEN_LIFETIME)

    async def verify(self, subject: FaceSubject, face_token: str) -> FaceRefusal | None:
        if face_token.startswith(SANDBOX_PREFIX):
            return FaceRefusal.UNKNOWN_TOKEN  # the sandbox's tokens mean nothing here
        if await self._spent.is_spent(face_token):
            return FaceRefusal.SPENT  # asked before the vendor: a replay costs no call
        request = models.GetDetectInfoEnhancedRequest()
        request.BizToken = face_token
        request.RuleId = self._options.rule_id
        request.InfoType = "1"
        try:
            response = await self._call(
                "GetDetectInfoEnhanced", lambda client: client.GetDetectInfoEnhanced(request)
            )
        except TencentCloudSDKException:  # one of TOKEN_ERRORS
            return FaceRefusal.UNKNOWN_TOKEN
        refusal = self._judge(subject, response.Text)
        if refusal is not None:
            return refusal
        if not await self._spent.spend(subject.user_id, face_token):
            return FaceRefusal.SPENT  # another call spent it meanwhile
        return None

    def _judge(self, subject: FaceSubject, text: models.DetectInfoText | None) -> FaceRefusal | None:
        if text is None or text.ErrCode != 0:
            return FaceRefusal.NOT_PASSED
        # Both compared, whatever the first says, so that the time does not tell which differed.
        same_id = _same(text.IdCard, subject.id_number)
        same_name = _same(text.Name, subject.name)
        if not (same_id and same_name):
            return FaceRefusal.OTHER_PERSON
        at = checked_at(text)
        now = self._clock.now()
        if at is None or not now - self._options.fresh_for <= at <= now + CLOCK_SKEW:
            return FaceRefusal.STALE
        return None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
