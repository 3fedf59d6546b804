"""The public API (gateway.proto, common.proto) keeps every name and number of the last release:
its messages, fields, enum values and RPCs, compared with the release's image in protos/releases/
(what `make breaking` gives buf; this check runs without it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import descriptor_pb2

from cardcheck import protodoc, protogen

RELEASE = protogen.PROTO_DIR / "releases" / "v0.1.0.binpb"


def _declarations(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, set[tuple]]:
    """Per public file, what a client relies on: each field, enum value and RPC as it is named."""
    found: dict[str, set[tuple]] = {}
    for file in fds.file:
        if file.name not in protodoc.PUBLIC:
            continue
        rows = found.setdefault(file.name, set())
        for message in file.message_type:
            rows.add(("message", message.name))
            for field in message.field:
                rows.add(("field", message.name, field.number, field.name, field.type, field.type_name, field.label))
        for enum in file.enum_type:
            for value in enum.value:
                rows.add(("value", enum.name, value.number, value.name))
        for service in file.service:
            for method in service.method:
                rows.add(("rpc", service.name, method.name, method.input_type, method.output_type,
                          method.client_streaming, method.server_streaming))
    return found


def _lost(current: descriptor_pb2.FileDescriptorSet) -> dict[str, set[tuple]]:
    release = _declarations(descriptor_pb2.FileDescriptorSet.FromString(RELEASE.read_bytes()))
    now = _declarations(current)
    assert set(release) == set(protodoc.PUBLIC)
    return {name: rows - now.get(name, set()) for name, rows in release.items() if rows - now.get(name, set())}


def test_the_public_api_keeps_every_name_and_number_of_the_release() -> None:
    assert _lost(protodoc.descriptor_set()) == {}


def test_a_renumbered_public_field_is_caught(tmp_path: Path) -> None:
    shutil.copytree(protogen.PROTO_DIR, tmp_path / "protos")
    proto = tmp_path / "protos" / "cardcheck" / "v1" / "gateway.proto"
    text = proto.read_text(encoding="utf-8")
    proto.write_text(text.replace("string payment_password = 2;", "string payment_password = 3;"), encoding="utf-8")
    lost = _lost(protodoc.descriptor_set(tmp_path / "protos"))
    assert lost == {
        "cardcheck/v1/gateway.proto": {
            ("field", "GetReportRequest", 2, "payment_password", descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
             "", descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        }
    }
