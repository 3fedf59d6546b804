"""docs/api.md is exactly what `make protos` generates from the comments in protos/, and every
declaration there has a comment to generate it from."""

from __future__ import annotations

import shutil
from pathlib import Path

from cardcheck import protodoc, protogen


def test_committed_docs_match_the_protos() -> None:
    text, _ = protodoc.render(protodoc.descriptor_set())
    assert protodoc.OUTPUT.read_text(encoding="utf-8") == text, "docs/api.md is stale: run `make protos`"


def test_every_service_rpc_message_field_and_enum_value_has_a_comment() -> None:
    _, missing = protodoc.render(protodoc.descriptor_set())
    assert missing == []


def test_a_declaration_without_a_comment_is_named(tmp_path: Path) -> None:
    shutil.copytree(protogen.PROTO_DIR, tmp_path / "protos")
    proto = tmp_path / "protos" / "cardcheck" / "v1" / "notifier.proto"
    text = proto.read_text(encoding="utf-8")
    proto.write_text(text.replace("  // The id Send gave. Required.\n", ""), encoding="utf-8")
    _, missing = protodoc.render(protodoc.descriptor_set(tmp_path / "protos"))
    assert missing == ["cardcheck/v1/notifier.proto: field GetDeliveryRequest.message_id"]


def test_the_public_api_comes_first_with_the_error_table_and_links_that_resolve() -> None:
    text = protodoc.OUTPUT.read_text(encoding="utf-8")
    assert text.index("## cardcheck/v1/gateway.proto") < text.index("# Internal services")
    assert text.index("## cardcheck/v1/common.proto") < text.index("# Internal services")
    assert "| `COOLDOWN_ACTIVE` | FAILED_PRECONDITION |" in text
    assert "| `SERVICE_BUSY` | RESOURCE_EXHAUSTED |" in text
    headings = {protodoc._slug(line.lstrip("#").strip()) for line in text.splitlines() if line.startswith("#")}
    links = {part.split(")", 1)[0] for part in text.split("](#")[1:]}
    assert links and links <= headings, sorted(links - headings)
