"""Generates docs/api.md from the comments in protos/: `python -m cardcheck.protodoc`.

protoc reads the protos with their source info (the comments and where each one stands), and
every service, RPC, message, field, enum and value is written out with its leading comment (a
trailing one is added after it). The public API (gateway.proto, common.proto) comes first, then
the internal services; the error table comes from cardcheck/runtime/errors.py REASONS. Nothing
in docs/api.md is written by hand: a test fails when it drifts from the protos."""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2

from cardcheck import protogen
from cardcheck.banks import BANKS
from cardcheck.runtime.errors import DOMAIN, REASONS
from cardcheck.v1 import common_pb2

OUTPUT = protogen.ROOT / "docs" / "api.md"
PUBLIC = ("cardcheck/v1/gateway.proto", "cardcheck/v1/common.proto")

# Where a declaration sits in FileDescriptorProto (descriptor.proto's field numbers), the
# paths of SourceCodeInfo.Location.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2

_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def descriptor_set(proto_dir: Path = protogen.PROTO_DIR) -> descriptor_pb2.FileDescriptorSet:
    """Every proto of protos/ (and what it imports), with comments."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "protos.binpb"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            "--include_imports",
            *(str(p.relative_to(proto_dir)) for p in sorted((proto_dir / "cardcheck" / "v1").glob("*.proto"))),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _clean(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.strip("\n").split("\n")]
    return "\n".join(line.rstrip() for line in lines).strip()


def _one_line(text: str) -> str:
    """A comment fit for a table cell."""
    return re.sub(r"\s*\n\s*", " ", text).replace("|", "\\|")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


class _Comments:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self.by_path = {tuple(loc.path): loc for loc in file.source_code_info.location}
        self.file = file.name
        self.missing: list[str] = []

    def of(self, path: tuple[int, ...], what: str) -> str:
        location = self.by_path.get(path)
        leading = _clean(location.leading_comments) if location else ""
        trailing = _clean(location.trailing_comments) if location else ""
        if not leading and not trailing:
            self.missing.append(f"{self.file}: {what}")
        return "\n".join(part for part in (leading, trailing) if part)

    def detached(self) -> list[str]:
        """Comments standing apart before a top-level declaration (a file's own remarks)."""
        found: list[str] = []
        for path, location in sorted(self.by_path.items()):
            if len(path) == 2 and path[0] in (FILE_MESSAGE, FILE_ENUM, FILE_SERVICE):
                found.extend(_clean(c) for c in location.leading_detached_comments)
        return [c for c in found if c]


class _Types:
    """Full type names to the text (and link) a field's type shows."""

    def __init__(
        self, files: Iterable[descriptor_pb2.FileDescriptorProto], messages: set[str], enums: set[str]
    ) -> None:
        self.map_entries: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.messages = messages  # the documented ones, linked to their section
        self.enums = enums
        for file in files:
            for message in file.message_type:
                self._walk(f".{file.package}.{message.name}", message)

    def _walk(self, name: str, message: descriptor_pb2.DescriptorProto) -> None:
        for nested in message.nested_type:
            full = f"{name}.{nested.name}"
            if nested.options.map_entry:
                self.map_entries[full] = nested
            self._walk(full, nested)

    def name(self, full: str) -> str:
        full = full.lstrip(".")
        short = full.rsplit(".", 1)[-1]
        if full in self.messages:
            return f"[{short}](#{_slug(f'message {short}')})"
        if full in self.enums:
            return f"[{short}](#{_slug(f'enum {short}')})"
        return f"`{full}`"

    def field(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if field.type_name in self.map_entries:
            key, value = self.map_entries[field.type_name].field
            return f"map<{self._plain(key)}, {self._plain(value)}>"
        shown = self._plain(field)
        if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            return f"repeated {shown}"
        if field.proto3_optional:
            return f"optional {shown}"
        return shown

    def _plain(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if field.type_name:
            return self.name(field.type_name)
        return _SCALARS[field.type]


def _service(service: descriptor_pb2.ServiceDescriptorProto, path: tuple[int, ...], package: str,
             comments: _Comments, types: _Types) -> Iterator[str]:
    yield f"### service {service.name}"
    yield ""
    yield f"`{package}.{service.name}`"
    yield ""
    yield comments.of(path, f"service {service.name}")
    yield ""
    for i, method in enumerate(service.method):
        streams = "stream " if method.server_streaming else ""
        asks = "stream " if method.client_streaming else ""
        yield f"#### {service.name}.{method.name}"
        yield ""
        yield f"{asks}{types.name(method.input_type)} → {streams}{types.name(method.output_type)}"
        yield ""
        yield comments.of((*path, SERVICE_METHOD, i), f"rpc {service.name}.{method.name}")
        yield ""


def _message(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], comments: _Comments,
             types: _Types) -> Iterator[str]:
    yield f"### message {message.name}"
    yield ""
    yield comments.of(path, f"message {message.name}")
    yield ""
    fields = [
        (field, comments.of((*path, MESSAGE_FIELD, i), f"field {message.name}.{field.name}"))
        for i, field in enumerate(message.field)
    ]
    if fields:
        yield "| field | number | type | meaning |"
        yield "|---|---|---|---|"
        for field, text in fields:
            yield f"| `{field.name}` | {field.number} | {types.field(field)} | {_one_line(text)} |"
        yield ""
    for i, nested in enumerate(message.enum_type):
        yield from _enum(nested, (*path, MESSAGE_ENUM, i), comments)


def _enum(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], comments: _Comments) -> Iterator[str]:
    yield f"### enum {enum.name}"
    yield ""
    yield comments.of(path, f"enum {enum.name}")
    yield ""
    yield "| value | number | meaning |"
    yield "|---|---|---|"
    for i, value in enumerate(enum.value):
        text = comments.of((*path, ENUM_VALUE, i), f"value {value.name}")
        yield f"| `{value.name}` | {value.number} | {_one_line(text)} |"
    yield ""


def _file(file: descriptor_pb2.FileDescriptorProto, types: _Types, missing: list[str]) -> Iterator[str]:
    comments = _Comments(file)
    yield f"## {file.name}"
    yield ""
    for remark in comments.detached():
        yield remark
        yield ""
    for i, service in enumerate(file.service):
        yield from _service(service, (FILE_SERVICE, i), file.package, comments, types)
    for i, enum in enumerate(file.enum_type):
        yield from _enum(enum, (FILE_ENUM, i), comments)
    for i, message in enumerate(file.message_type):
        if not message.options.map_entry:
            yield from _message(message, (FILE_MESSAGE, i), comments, types)
    missing.extend(comments.missing)


def _errors() -> Iterator[str]:
    yield "## Errors"
    yield ""
    yield (
        f"Every refusal is a `google.rpc.Status` with a `google.rpc.ErrorInfo` (domain `{DOMAIN}`, "
        "the reason below, metadata where the RPC's comment names it) and a `google.rpc.LocalizedMessage` "
        "in zh-CN; INVALID_ARGUMENT also carries a `google.rpc.BadRequest` naming the fields, and "
        "RESOURCE_EXHAUSTED (and STREAM_EXPIRED) a `google.rpc.RetryInfo`. Bad input is never INTERNAL. "
        "The reasons, from `cardcheck/runtime/errors.py`:"
    )
    yield ""
    yield "| reason | status | message (zh-CN) |"
    yield "|---|---|---|"
    for reason, spec in REASONS.items():
        yield f"| `{reason}` | {spec.code.name} | {spec.message_zh} |"
    yield ""


def _banks() -> Iterator[str]:
    yield "## Bank codes"
    yield ""
    yield "The 24 banks a query may name (`cardcheck/banks.py`), in the order ListBanks gives them:"
    yield ""
    yield "| code | name | kind |"
    yield "|---|---|---|"
    for bank in BANKS:
        kind = common_pb2.BankKind.Name(bank.kind).removeprefix("BANK_KIND_")
        yield f"| `{bank.code}` | {bank.name} | {kind} |"
    yield ""


def render(fds: descriptor_pb2.FileDescriptorSet) -> tuple[str, list[str]]:
    """docs/api.md's text, and the declarations that have no comment."""
    ours = [f for f in fds.file if f.name.startswith("cardcheck/")]
    order = {name: i for i, name in enumerate(PUBLIC)}
    ours.sort(key=lambda f: (order.get(f.name, len(order)), f.name))
    messages = {f"{file.package}.{message.name}" for file in ours for message in file.message_type}
    enums = {f"{file.package}.{enum.name}" for file in ours for enum in file.enum_type}
    types = _Types(fds.file, messages, enums)
    missing: list[str] = []
    lines = [
        "# The cardcheck API",
        "",
        "<!-- Generated from the comments in protos/ by `make protos` (cardcheck/protodoc.py): do not edit. -->",
        "",
        "The gRPC services of proto package `cardcheck.v1`. The public API is `cardcheck.v1.CardCheck` "
        "(gateway.proto, with the types of common.proto): the only service clients reach. The internal "
        "services (report_service, bank_connector, notifier, and the bank-side protocol bank_sim speaks) "
        "deploy together from one image and may change with it; the public API stays wire-compatible "
        "(`make breaking`). Every server also serves `grpc.health.v1.Health` and server reflection. "
        "The processes, their ports and the `CARDCHECK_*` settings are in the "
        "[README](../README.md#configuration).",
        "",
    ]
    lines.extend(_errors())
    lines.extend(_banks())
    public_done = False
    lines.extend(["# Public API", ""])
    for file in ours:
        if file.name not in PUBLIC and not public_done:
            public_done = True
            lines.extend(["# Internal services", ""])
        lines.extend(_file(file, types, missing))
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"
    return text, missing


def main() -> None:
    text, missing = render(descriptor_set())
    if missing:
        raise SystemExit("no comment on:\n  " + "\n  ".join(missing))
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(protogen.ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
