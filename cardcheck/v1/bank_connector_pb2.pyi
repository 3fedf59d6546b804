from cardcheck.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FanOutRequest(_message.Message):
    __slots__ = ("id_number", "name", "bank_codes", "per_bank_timeout_ms")
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BANK_CODES_FIELD_NUMBER: _ClassVar[int]
    PER_BANK_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    id_number: str
    name: str
    bank_codes: _containers.RepeatedScalarFieldContainer[str]
    per_bank_timeout_ms: int
    def __init__(self, id_number: _Optional[str] = ..., name: _Optional[str] = ..., bank_codes: _Optional[_Iterable[str]] = ..., per_bank_timeout_ms: _Optional[int] = ...) -> None: ...

class FanOutResponse(_message.Message):
    __slots__ = ("bank_code", "kind", "cards", "detail", "attempts", "latency_ms")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    kind: _common_pb2.BankOutcomeKind
    cards: _containers.RepeatedCompositeFieldContainer[_common_pb2.MaskedCard]
    detail: str
    attempts: int
    latency_ms: int
    def __init__(self, bank_code: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.BankOutcomeKind, str]] = ..., cards: _Optional[_Iterable[_Union[_common_pb2.MaskedCard, _Mapping]]] = ..., detail: _Optional[str] = ..., attempts: _Optional[int] = ..., latency_ms: _Optional[int] = ...) -> None: ...

class VerifyRealNameRequest(_message.Message):
    __slots__ = ("card_number", "name", "id_number", "phone")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    name: str
    id_number: str
    phone: str
    def __init__(self, card_number: _Optional[str] = ..., name: _Optional[str] = ..., id_number: _Optional[str] = ..., phone: _Optional[str] = ...) -> None: ...

class VerifyRealNameResponse(_message.Message):
    __slots__ = ("confirmed", "bank_code")
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    confirmed: bool
    bank_code: str
    def __init__(self, confirmed: _Optional[bool] = ..., bank_code: _Optional[str] = ...) -> None: ...

class BankConnectorListBanksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BankConnectorListBanksResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Bank]
    def __init__(self, banks: _Optional[_Iterable[_Union[_common_pb2.Bank, _Mapping]]] = ...) -> None: ...

class GetBankHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BankHealth(_message.Message):
    __slots__ = ("bank_code", "calls", "failures", "success_rate", "latency_p50_ms", "latency_p99_ms", "breaker_state", "retries", "short_circuited", "breaker_openings", "in_flight", "concurrency_limit", "waiting")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    SHORT_CIRCUITED_FIELD_NUMBER: _ClassVar[int]
    BREAKER_OPENINGS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    calls: int
    failures: int
    success_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    breaker_state: str
    retries: int
    short_circuited: int
    breaker_openings: int
    in_flight: int
    concurrency_limit: int
    waiting: int
    def __init__(self, bank_code: _Optional[str] = ..., calls: _Optional[int] = ..., failures: _Optional[int] = ..., success_rate: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., breaker_state: _Optional[str] = ..., retries: _Optional[int] = ..., short_circuited: _Optional[int] = ..., breaker_openings: _Optional[int] = ..., in_flight: _Optional[int] = ..., concurrency_limit: _Optional[int] = ..., waiting: _Optional[int] = ...) -> None: ...

class GetBankHealthResponse(_message.Message):
    __slots__ = ("banks", "requests_active", "requests_queued", "requests_refused")
    BANKS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[BankHealth]
    requests_active: int
    requests_queued: int
    requests_refused: int
    def __init__(self, banks: _Optional[_Iterable[_Union[BankHealth, _Mapping]]] = ..., requests_active: _Optional[int] = ..., requests_queued: _Optional[int] = ..., requests_refused: _Optional[int] = ...) -> None: ...
