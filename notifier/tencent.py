"""Tencent Cloud SMS (SendSms, API 2021-01-11) through the official SDK's asyncio client.

One request per message: the phone (+86...), the kind's approved template ID with the vendor
parameters in order (notifier/templates.py VENDOR_PARAMS), the SdkAppId and signature, and the
message_id as SessionContext. Tencent hands SessionContext back on the status and on every
delivery receipt, so each attempt of one message is recognisable as the same message; it does
not deduplicate on it: a request accepted whose answer was lost (a timeout) and retried sends the
text again (at least once, as every provider). Once an attempt is accepted the delivery worker
records the message DELIVERED and never sends it again.

What Tencent answers is settled by CODES: delivered ("Ok"), worth retrying, or refused for good.
Neither the secrets, the phone nor the parameters (they hold codes) are ever logged."""

from __future__ import annotations

import asyncio
import logging

import httpx
from tencentcloud.common.credential import Credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.sms.v20210111 import models, sms_client_async

from notifier.config import NotifierConfig, tencent_endpoint
from notifier.providers import DeliveryError, OutgoingSms, SmsProvider

# The SDK logs whole requests and answers (phone, parameters, the SecretId) at DEBUG: never, even
# when the service's own level is DEBUG.
logging.getLogger("tencentcloud_sdk_common").setLevel(logging.INFO)

DELIVERED = "Ok"
RETRY, PERMANENT = True, False
MAX_ERROR_CLASS = 40  # what a message's last_error holds

# Tencent's codes (SendStatusSet[i].Code for one phone, Response.Error.Code for the whole
# request, the SDK's own for a transport failure) -> may a later attempt of the same message
# pass? An exact code first, then the longest prefix (ending in "."). A code in neither is
# retried: the retry window of the message's kind bounds it (5 minutes for a code), and its
# code becomes the message's last_error, on GetDelivery and in the logs, to be added here.
CODES: dict[str, bool] = {
    # The phone's or the application's sending limits: the same message passes later (a code's
    # retry window is shorter than most of them, and then it expires).
    "LimitExceeded.": RETRY,
    "LimitExceeded.PhoneNumberCountLimit": PERMANENT,  # too many phones in one request: a bug here
    "LimitExceeded.AppCountryOrRegionInBlacklist": PERMANENT,
    "RequestLimitExceeded": RETRY,  # the API's own rate limit
    # Tencent's side failing, or the request taking too long there.
    "InternalError.": RETRY,
    "InternalError.RestApiInterfaceNotExist": PERMANENT,
    "InternalError.SigFieldMissing": PERMANENT,
    "RequestTimeout": RETRY,
    "ServerNetworkError": RETRY,  # the SDK: an answer that is not HTTP 200
    "ClientNetworkError": RETRY,  # the SDK: the request did not get through
    # The key's signature: a clock off or a request slow in flight ("expire"), a key being
    # rotated (the same request may pass once the new one is live, as a webhook's 401).
    "AuthFailure.": RETRY,
    # Money: an operator tops the account up, and the message still goes within its window.
    "FailedOperation.InsufficientBalanceInSmsPackage": RETRY,
    "UnauthorizedOperation.ServiceSuspendDueToArrears": RETRY,
    "FailedOperation.OtherError": RETRY,
    # The template, the signature or the application is wrong or not approved: no retry helps.
    "FailedOperation.": PERMANENT,
    "FailedOperation.TemplateIncorrectOrUnapproved": PERMANENT,
    "FailedOperation.SignatureIncorrectOrUnapproved": PERMANENT,
    "UnauthorizedOperation.": PERMANENT,  # IP not allowed, SdkAppId disabled or not this key's
    # The request itself: the phone, a parameter's format or length, a missing field.
    "InvalidParameterValue.": PERMANENT,
    "InvalidParameterValue.IncorrectPhoneNumber": PERMANENT,
    "InvalidParameter": PERMANENT,
    "InvalidParameter.": PERMANENT,
    "MissingParameter": PERMANENT,
    "MissingParameter.": PERMANENT,
    "UnsupportedOperation": PERMANENT,
    "UnsupportedOperation.": PERMANENT,
}


def retryable(code: str) -> bool:
    """May a later attempt pass, after Tencent answered `code`? (CODES; unknown: yes)."""
    if code in CODES:
        return CODES[code]
    prefixes = [p for p in CODES if p.endswith(".") and code.startswith(p)]
    return CODES[max(prefixes, key=len)] if prefixes else RETRY


def refusal(code: str) -> DeliveryError:
    return DeliveryError(code[:MAX_ERROR_CLASS] or "TENCENT_UNKNOWN", retryable=retryable(code))


class TencentSmsProvider(SmsProvider):
    """SendSms within a timeout, at most `max_concurrent` requests at once (a burst of Sends
    waits for a slot rather than opening a connection each)."""

    name = "tencent"

    def __init__(
        self,
        *,
        secret_id: str,
        secret_key: str,
        sdk_app_id: str,
        sign_name: str,
        templates: dict[str, str],
        endpoint: str,
        region: str,
        timeout_s: float,
        max_concurrent: int = 16,
    ) -> None:
        scheme, host = tencent_endpoint(endpoint)
        self._endpoint = f"{scheme}://{host}"
        self._sdk_app_id = sdk_app_id
        self._sign_name = sign_name
        self._templates = dict(templates)
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)
        http = HttpProfile(protocol=scheme, endpoint=host, reqTimeout=timeout_s, keepAlive=True)
        # No region breaker: it would switch to another Tencent host than the one configured.
        profile = ClientProfile(httpProfile=http, disable_region_breaker=True)
        self._client = sms_client_async.SmsClient(Credential(secret_id, secret_key), region, profile)

    def __repr__(self) -> str:  # never the credential
        return f"TencentSmsProvider({self._endpoint}, SdkAppId {self._sdk_app_id})"

    def _request(self, sms: OutgoingSms) -> models.SendSmsRequest:
        template_id = self._templates.get(sms.kind)
        if template_id is None:
            raise DeliveryError("TENCENT_NO_TEMPLATE", retryable=False)
        request = models.SendSmsRequest()
        request.PhoneNumberSet = [f"+86{sms.phone}"]
        request.SmsSdkAppId = self._sdk_app_id
        request.SignName = self._sign_name
        request.TemplateId = template_id
        request.TemplateParamSet = list(sms.params)
        request.SessionContext = sms.message_id
        return request

    async def deliver(self, sms: OutgoingSms) -> None:
        request = self._request(sms)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise DeliveryError("BUSY") from None  # nothing was sent
        try:
            # The SDK's timeout bounds each phase; this bounds the whole request.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.SendSms(request)
        except (TimeoutError, httpx.TimeoutException):
            raise DeliveryError("TIMEOUT") from None
        except httpx.TransportError:
            raise DeliveryError("CONNECTION") from None
        except TencentCloudSDKException as error:
            raise refusal(str(error.get_code() or "")) from None
        finally:
            self._slots.release()
        statuses = response.SendStatusSet or []
        if not statuses:
            raise DeliveryError("TENCENT_NO_STATUS")
        code = str(statuses[0].Code or "")
        if code != DELIVERED:
            raise refusal(code)

    async def close(self) -> None:
        await self._client.close()


def tencent_provider(config: NotifierConfig) -> TencentSmsProvider:
    """The provider as configured (NotifierConfig has checked that nothing is missing)."""
    assert config.tencent_secret_id and config.tencent_secret_key
    assert config.tencent_sms_sdk_app_id and config.tencent_sms_sign_name
    return TencentSmsProvider(
        secret_id=config.tencent_secret_id,
        secret_key=config.tencent_secret_key,
        sdk_app_id=config.tencent_sms_sdk_app_id,
        sign_name=config.tencent_sms_sign_name,
        templates=dict(config.tencent_sms_templates),
        endpoint=config.tencent_sms_endpoint,
        region=config.tencent_sms_region,
        timeout_s=config.tencent_sms_timeout_s,
        max_concurrent=config.max_in_flight,
    )
