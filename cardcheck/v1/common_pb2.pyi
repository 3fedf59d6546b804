import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CardType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CARD_TYPE_UNSPECIFIED: _ClassVar[CardType]
    CARD_TYPE_DEBIT: _ClassVar[CardType]
    CARD_TYPE_CREDIT: _ClassVar[CardType]

class BankKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BANK_KIND_UNSPECIFIED: _ClassVar[BankKind]
    BANK_KIND_NATIONAL: _ClassVar[BankKind]
    BANK_KIND_REGIONAL: _ClassVar[BankKind]

class QueryStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUERY_STATUS_UNSPECIFIED: _ClassVar[QueryStatus]
    QUERY_STATUS_PENDING: _ClassVar[QueryStatus]
    QUERY_STATUS_READY: _ClassVar[QueryStatus]
    QUERY_STATUS_FAILED: _ClassVar[QueryStatus]
    QUERY_STATUS_EXPIRED: _ClassVar[QueryStatus]

class SmsPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SMS_PURPOSE_UNSPECIFIED: _ClassVar[SmsPurpose]
    SMS_PURPOSE_REGISTER: _ClassVar[SmsPurpose]
    SMS_PURPOSE_SIGN_IN: _ClassVar[SmsPurpose]
    SMS_PURPOSE_QUERY_AUTH: _ClassVar[SmsPurpose]

class BankOutcomeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BANK_OUTCOME_KIND_UNSPECIFIED: _ClassVar[BankOutcomeKind]
    BANK_OUTCOME_KIND_ANSWERED: _ClassVar[BankOutcomeKind]
    BANK_OUTCOME_KIND_TIMED_OUT: _ClassVar[BankOutcomeKind]
    BANK_OUTCOME_KIND_ERROR: _ClassVar[BankOutcomeKind]
    BANK_OUTCOME_KIND_CIRCUIT_OPEN: _ClassVar[BankOutcomeKind]
CARD_TYPE_UNSPECIFIED: CardType
CARD_TYPE_DEBIT: CardType
CARD_TYPE_CREDIT: CardType
BANK_KIND_UNSPECIFIED: BankKind
BANK_KIND_NATIONAL: BankKind
BANK_KIND_REGIONAL: BankKind
QUERY_STATUS_UNSPECIFIED: QueryStatus
QUERY_STATUS_PENDING: QueryStatus
QUERY_STATUS_READY: QueryStatus
QUERY_STATUS_FAILED: QueryStatus
QUERY_STATUS_EXPIRED: QueryStatus
SMS_PURPOSE_UNSPECIFIED: SmsPurpose
SMS_PURPOSE_REGISTER: SmsPurpose
SMS_PURPOSE_SIGN_IN: SmsPurpose
SMS_PURPOSE_QUERY_AUTH: SmsPurpose
BANK_OUTCOME_KIND_UNSPECIFIED: BankOutcomeKind
BANK_OUTCOME_KIND_ANSWERED: BankOutcomeKind
BANK_OUTCOME_KIND_TIMED_OUT: BankOutcomeKind
BANK_OUTCOME_KIND_ERROR: BankOutcomeKind
BANK_OUTCOME_KIND_CIRCUIT_OPEN: BankOutcomeKind

class Bank(_message.Message):
    __slots__ = ("code", "name", "kind", "available")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    code: str
    name: str
    kind: BankKind
    available: bool
    def __init__(self, code: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[_Union[BankKind, str]] = ..., available: _Optional[bool] = ...) -> None: ...

class MaskedCard(_message.Message):
    __slots__ = ("bank_code", "bank_name", "card_type", "first4", "last4")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    BANK_NAME_FIELD_NUMBER: _ClassVar[int]
    CARD_TYPE_FIELD_NUMBER: _ClassVar[int]
    FIRST4_FIELD_NUMBER: _ClassVar[int]
    LAST4_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    bank_name: str
    card_type: CardType
    first4: str
    last4: str
    def __init__(self, bank_code: _Optional[str] = ..., bank_name: _Optional[str] = ..., card_type: _Optional[_Union[CardType, str]] = ..., first4: _Optional[str] = ..., last4: _Optional[str] = ...) -> None: ...

class BankSummary(_message.Message):
    __slots__ = ("bank_code", "bank_name", "debit_count", "credit_count")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    BANK_NAME_FIELD_NUMBER: _ClassVar[int]
    DEBIT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_COUNT_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    bank_name: str
    debit_count: int
    credit_count: int
    def __init__(self, bank_code: _Optional[str] = ..., bank_name: _Optional[str] = ..., debit_count: _Optional[int] = ..., credit_count: _Optional[int] = ...) -> None: ...

class UnavailableBank(_message.Message):
    __slots__ = ("bank_code", "reason")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    reason: str
    def __init__(self, bank_code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("query_id", "status", "bank_codes", "submitted_at", "ready_by", "ready_at", "expires_at", "banks_answered", "banks_total", "agreement_version")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BANK_CODES_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_BY_FIELD_NUMBER: _ClassVar[int]
    READY_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BANKS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    BANKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    status: QueryStatus
    bank_codes: _containers.RepeatedScalarFieldContainer[str]
    submitted_at: _timestamp_pb2.Timestamp
    ready_by: _timestamp_pb2.Timestamp
    ready_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    banks_answered: int
    banks_total: int
    agreement_version: str
    def __init__(self, query_id: _Optional[str] = ..., status: _Optional[_Union[QueryStatus, str]] = ..., bank_codes: _Optional[_Iterable[str]] = ..., submitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready_by: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., banks_answered: _Optional[int] = ..., banks_total: _Optional[int] = ..., agreement_version: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("query_id", "generated_at", "expires_at", "summary", "cards", "unavailable_banks", "notice")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_BANKS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    generated_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    summary: _containers.RepeatedCompositeFieldContainer[BankSummary]
    cards: _containers.RepeatedCompositeFieldContainer[MaskedCard]
    unavailable_banks: _containers.RepeatedCompositeFieldContainer[UnavailableBank]
    notice: str
    def __init__(self, query_id: _Optional[str] = ..., generated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., summary: _Optional[_Iterable[_Union[BankSummary, _Mapping]]] = ..., cards: _Optional[_Iterable[_Union[MaskedCard, _Mapping]]] = ..., unavailable_banks: _Optional[_Iterable[_Union[UnavailableBank, _Mapping]]] = ..., notice: _Optional[str] = ...) -> None: ...

class BankOutcome(_message.Message):
    __slots__ = ("bank_code", "kind", "cards", "detail", "attempts", "latency_ms")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    kind: BankOutcomeKind
    cards: _containers.RepeatedCompositeFieldContainer[MaskedCard]
    detail: str
    attempts: int
    latency_ms: int
    def __init__(self, bank_code: _Optional[str] = ..., kind: _Optional[_Union[BankOutcomeKind, str]] = ..., cards: _Optional[_Iterable[_Union[MaskedCard, _Mapping]]] = ..., detail: _Optional[str] = ..., attempts: _Optional[int] = ..., latency_ms: _Optional[int] = ...) -> None: ...
