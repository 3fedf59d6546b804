import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from cardcheck.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListBanksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBanksResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Bank]
    def __init__(self, banks: _Optional[_Iterable[_Union[_common_pb2.Bank, _Mapping]]] = ...) -> None: ...

class GetAgreementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Agreement(_message.Message):
    __slots__ = ("version", "title", "text")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    version: str
    title: str
    text: str
    def __init__(self, version: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class RequestSmsCodeRequest(_message.Message):
    __slots__ = ("phone", "purpose")
    PHONE_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    phone: str
    purpose: _common_pb2.SmsPurpose
    def __init__(self, phone: _Optional[str] = ..., purpose: _Optional[_Union[_common_pb2.SmsPurpose, str]] = ...) -> None: ...

class SmsChallenge(_message.Message):
    __slots__ = ("challenge_id", "expires_in_seconds", "resend_after_seconds")
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESEND_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    challenge_id: str
    expires_in_seconds: int
    resend_after_seconds: int
    def __init__(self, challenge_id: _Optional[str] = ..., expires_in_seconds: _Optional[int] = ..., resend_after_seconds: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "id_number", "phone", "challenge_id", "sms_code", "card_number", "payment_password", "region")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    SMS_CODE_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    name: str
    id_number: str
    phone: str
    challenge_id: str
    sms_code: str
    card_number: str
    payment_password: str
    region: str
    def __init__(self, name: _Optional[str] = ..., id_number: _Optional[str] = ..., phone: _Optional[str] = ..., challenge_id: _Optional[str] = ..., sms_code: _Optional[str] = ..., card_number: _Optional[str] = ..., payment_password: _Optional[str] = ..., region: _Optional[str] = ...) -> None: ...

class SignInRequest(_message.Message):
    __slots__ = ("phone", "challenge_id", "sms_code")
    PHONE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    SMS_CODE_FIELD_NUMBER: _ClassVar[int]
    phone: str
    challenge_id: str
    sms_code: str
    def __init__(self, phone: _Optional[str] = ..., challenge_id: _Optional[str] = ..., sms_code: _Optional[str] = ...) -> None: ...

class SignOutRequest(_message.Message):
    __slots__ = ("everywhere",)
    EVERYWHERE_FIELD_NUMBER: _ClassVar[int]
    everywhere: bool
    def __init__(self, everywhere: _Optional[bool] = ...) -> None: ...

class SignOutResponse(_message.Message):
    __slots__ = ("sessions_ended",)
    SESSIONS_ENDED_FIELD_NUMBER: _ClassVar[int]
    sessions_ended: int
    def __init__(self, sessions_ended: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("user_id", "session_token", "expires_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_token: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., session_token: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitQueryRequest(_message.Message):
    __slots__ = ("bank_codes", "agreement_version", "consent_given", "challenge_id", "sms_code", "face_token", "idempotency_key")
    BANK_CODES_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSENT_GIVEN_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    SMS_CODE_FIELD_NUMBER: _ClassVar[int]
    FACE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    bank_codes: _containers.RepeatedScalarFieldContainer[str]
    agreement_version: str
    consent_given: bool
    challenge_id: str
    sms_code: str
    face_token: str
    idempotency_key: str
    def __init__(self, bank_codes: _Optional[_Iterable[str]] = ..., agreement_version: _Optional[str] = ..., consent_given: _Optional[bool] = ..., challenge_id: _Optional[str] = ..., sms_code: _Optional[str] = ..., face_token: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class WatchQueryRequest(_message.Message):
    __slots__ = ("query_id",)
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    def __init__(self, query_id: _Optional[str] = ...) -> None: ...

class QueryEvent(_message.Message):
    __slots__ = ("query", "outcome", "outcomes")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Query
    outcome: _common_pb2.BankOutcome
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.BankOutcome]
    def __init__(self, query: _Optional[_Union[_common_pb2.Query, _Mapping]] = ..., outcome: _Optional[_Union[_common_pb2.BankOutcome, _Mapping]] = ..., outcomes: _Optional[_Iterable[_Union[_common_pb2.BankOutcome, _Mapping]]] = ...) -> None: ...

class ListQueriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListQueriesResponse(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[_common_pb2.Query]
    def __init__(self, queries: _Optional[_Iterable[_Union[_common_pb2.Query, _Mapping]]] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("query_id", "payment_password")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    payment_password: str
    def __init__(self, query_id: _Optional[str] = ..., payment_password: _Optional[str] = ...) -> None: ...

class ResetPaymentPasswordRequest(_message.Message):
    __slots__ = ("challenge_id", "sms_code", "face_token", "new_payment_password")
    CHALLENGE_ID_FIELD_NUMBER: _ClassVar[int]
    SMS_CODE_FIELD_NUMBER: _ClassVar[int]
    FACE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEW_PAYMENT_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    challenge_id: str
    sms_code: str
    face_token: str
    new_payment_password: str
    def __init__(self, challenge_id: _Optional[str] = ..., sms_code: _Optional[str] = ..., face_token: _Optional[str] = ..., new_payment_password: _Optional[str] = ...) -> None: ...

class ResetPaymentPasswordResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
