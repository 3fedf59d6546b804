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
