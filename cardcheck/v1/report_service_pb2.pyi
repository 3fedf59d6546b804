from cardcheck.v1 import common_pb2 as _common_pb2
from cardcheck.v1 import gateway_pb2 as _gateway_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Subject(_message.Message):
    __slots__ = ("name", "id_number", "phone")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    name: str
    id_number: str
    phone: str
    def __init__(self, name: _Optional[str] = ..., id_number: _Optional[str] = ..., phone: _Optional[str] = ...) -> None: ...

class CreateQueryRequest(_message.Message):
    __slots__ = ("user_id", "subject", "bank_codes", "agreement_version", "idempotency_key")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    BANK_CODES_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    subject: Subject
    bank_codes: _containers.RepeatedScalarFieldContainer[str]
    agreement_version: str
    idempotency_key: str
    def __init__(self, user_id: _Optional[str] = ..., subject: _Optional[_Union[Subject, _Mapping]] = ..., bank_codes: _Optional[_Iterable[str]] = ..., agreement_version: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GetQueryRequest(_message.Message):
    __slots__ = ("user_id", "query_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query_id: str
    def __init__(self, user_id: _Optional[str] = ..., query_id: _Optional[str] = ...) -> None: ...

class ListUserQueriesRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...
