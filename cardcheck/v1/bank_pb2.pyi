from cardcheck.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupCardsRequest(_message.Message):
    __slots__ = ("bank_code", "id_number", "name")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    id_number: str
    name: str
    def __init__(self, bank_code: _Optional[str] = ..., id_number: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class BankCard(_message.Message):
    __slots__ = ("pan", "card_type")
    PAN_FIELD_NUMBER: _ClassVar[int]
    CARD_TYPE_FIELD_NUMBER: _ClassVar[int]
    pan: str
    card_type: _common_pb2.CardType
    def __init__(self, pan: _Optional[str] = ..., card_type: _Optional[_Union[_common_pb2.CardType, str]] = ...) -> None: ...

class LookupCardsResponse(_message.Message):
    __slots__ = ("cards",)
    CARDS_FIELD_NUMBER: _ClassVar[int]
    cards: _containers.RepeatedCompositeFieldContainer[BankCard]
    def __init__(self, cards: _Optional[_Iterable[_Union[BankCard, _Mapping]]] = ...) -> None: ...

class VerifyCardRequest(_message.Message):
    __slots__ = ("bank_code", "card_number", "name", "id_number", "phone")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    card_number: str
    name: str
    id_number: str
    phone: str
    def __init__(self, bank_code: _Optional[str] = ..., card_number: _Optional[str] = ..., name: _Optional[str] = ..., id_number: _Optional[str] = ..., phone: _Optional[str] = ...) -> None: ...

class VerifyCardResponse(_message.Message):
    __slots__ = ("holds_card", "confirmed")
    HOLDS_CARD_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    holds_card: bool
    confirmed: bool
    def __init__(self, holds_card: _Optional[bool] = ..., confirmed: _Optional[bool] = ...) -> None: ...

class BankBehaviour(_message.Message):
    __slots__ = ("latency_ms", "latency_p99_ms", "error_rate", "error_code", "hang_rate", "down", "malformed_rate", "capacity")
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    HANG_RATE_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_RATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    latency_ms: float
    latency_p99_ms: float
    error_rate: float
    error_code: str
    hang_rate: float
    down: bool
    malformed_rate: float
    capacity: int
    def __init__(self, latency_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., error_rate: _Optional[float] = ..., error_code: _Optional[str] = ..., hang_rate: _Optional[float] = ..., down: _Optional[bool] = ..., malformed_rate: _Optional[float] = ..., capacity: _Optional[int] = ...) -> None: ...

class SetBehaviourRequest(_message.Message):
    __slots__ = ("bank_codes", "behaviour", "reset")
    BANK_CODES_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    bank_codes: _containers.RepeatedScalarFieldContainer[str]
    behaviour: BankBehaviour
    reset: bool
    def __init__(self, bank_codes: _Optional[_Iterable[str]] = ..., behaviour: _Optional[_Union[BankBehaviour, _Mapping]] = ..., reset: _Optional[bool] = ...) -> None: ...

class SetBehaviourResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[SimulatedBankState]
    def __init__(self, banks: _Optional[_Iterable[_Union[SimulatedBankState, _Mapping]]] = ...) -> None: ...

class GetBehaviourRequest(_message.Message):
    __slots__ = ("bank_codes",)
    BANK_CODES_FIELD_NUMBER: _ClassVar[int]
    bank_codes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bank_codes: _Optional[_Iterable[str]] = ...) -> None: ...

class GetBehaviourResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[SimulatedBankState]
    def __init__(self, banks: _Optional[_Iterable[_Union[SimulatedBankState, _Mapping]]] = ...) -> None: ...

class SimulatedBankState(_message.Message):
    __slots__ = ("bank_code", "behaviour", "calls", "refused", "failed", "in_flight", "address", "lookup_calls", "verify_calls")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_CALLS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_CALLS_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    behaviour: BankBehaviour
    calls: int
    refused: int
    failed: int
    in_flight: int
    address: str
    lookup_calls: int
    verify_calls: int
    def __init__(self, bank_code: _Optional[str] = ..., behaviour: _Optional[_Union[BankBehaviour, _Mapping]] = ..., calls: _Optional[int] = ..., refused: _Optional[int] = ..., failed: _Optional[int] = ..., in_flight: _Optional[int] = ..., address: _Optional[str] = ..., lookup_calls: _Optional[int] = ..., verify_calls: _Optional[int] = ...) -> None: ...
