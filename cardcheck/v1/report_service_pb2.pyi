from cardcheck.v1 import common_pb2 as _common_pb2
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

class CreateQueryResponse(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Query
    def __init__(self, query: _Optional[_Union[_common_pb2.Query, _Mapping]] = ...) -> None: ...

class GetQueryRequest(_message.Message):
    __slots__ = ("user_id", "query_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query_id: str
    def __init__(self, user_id: _Optional[str] = ..., query_id: _Optional[str] = ...) -> None: ...

class GetQueryResponse(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Query
    def __init__(self, query: _Optional[_Union[_common_pb2.Query, _Mapping]] = ...) -> None: ...

class ReportServiceListQueriesRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ReportServiceListQueriesResponse(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[_common_pb2.Query]
    def __init__(self, queries: _Optional[_Iterable[_Union[_common_pb2.Query, _Mapping]]] = ...) -> None: ...

class ReportServiceWatchQueryRequest(_message.Message):
    __slots__ = ("user_id", "query_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query_id: str
    def __init__(self, user_id: _Optional[str] = ..., query_id: _Optional[str] = ...) -> None: ...

class ReportServiceWatchQueryResponse(_message.Message):
    __slots__ = ("query", "outcome", "outcomes")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Query
    outcome: BankProgress
    outcomes: _containers.RepeatedCompositeFieldContainer[BankProgress]
    def __init__(self, query: _Optional[_Union[_common_pb2.Query, _Mapping]] = ..., outcome: _Optional[_Union[BankProgress, _Mapping]] = ..., outcomes: _Optional[_Iterable[_Union[BankProgress, _Mapping]]] = ...) -> None: ...

class BankProgress(_message.Message):
    __slots__ = ("bank_code", "kind", "detail")
    BANK_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    bank_code: str
    kind: _common_pb2.BankOutcomeKind
    detail: str
    def __init__(self, bank_code: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.BankOutcomeKind, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ReportServiceGetReportRequest(_message.Message):
    __slots__ = ("user_id", "query_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    query_id: str
    def __init__(self, user_id: _Optional[str] = ..., query_id: _Optional[str] = ...) -> None: ...

class ReportServiceGetReportResponse(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: _common_pb2.Report
    def __init__(self, report: _Optional[_Union[_common_pb2.Report, _Mapping]] = ...) -> None: ...
