"""The Chinese SMS texts, one file per kind and version under notifier/templates/
(`sms_code.v1.txt`, `report_ready.v1.txt`, ...), filled in with string.Template. The highest
version of each kind is the one sent; the version goes on the message record.

An SMS vendor keeps its own approved copy of each text and takes a template ID with the values
of its placeholders in order: `vendor_params` gives those values, the same ones our text is
rendered with (the sandbox inbox and the webhook carry our text)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_FILE_NAME = re.compile(r"^(?P<kind>[a-z_]+)\.v(?P<version>\d+)\.txt$")

# What each kind of SMS needs from the caller.
REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "SMS_CODE": ("code", "purpose"),
    "REPORT_READY": (),
    "CONSENT_RECEIPT": ("agreement_version",),
}

# The values a vendor's template takes, in the order of its placeholders ({1}, {2}, ...): a
# vendor template is approved against our text with these in its place.
VENDOR_PARAMS: dict[str, tuple[str, ...]] = {
    "SMS_CODE": ("code", "purpose_zh", "minutes"),
    "REPORT_READY": ("days",),
    "CONSENT_RECEIPT": ("agreement_version",),
}
CODE_VALID_MINUTES = 5  # the gateway's code lifetime, as the text tells it
REPORT_KEPT_DAYS = 7  # report_service's retention, as the text tells it

PURPOSE_ZH = {"REGISTER": "注册", "SIGN_IN": "登录", "QUERY_AUTH": "一键查卡授权"}
_CODE = re.compile(r"^\d{4,8}$")
_AGREEMENT_VERSION = re.compile(r"^[0-9A-Za-z._-]{1,32}$")


def purpose_key(raw: str) -> str:
    """`REGISTER` and `SMS_PURPOSE_REGISTER` both name the register purpose."""
    return raw.strip().upper().removeprefix("SMS_PURPOSE_")


def param_problems(kind: str, params: Mapping[str, str]) -> dict[str, str]:
    """Field (`params[name]`) -> what is wrong, for the parameters of `kind`."""
    problems: dict[str, str] = {}
    for name in REQUIRED_PARAMS[kind]:
        if not params.get(name, "").strip():
            problems[f"params[{name}]"] = f"{name} is required for {kind}"
    if kind == "SMS_CODE":
        code = params.get("code", "")
        if code and not _CODE.match(code):
            problems["params[code]"] = "code must be 4 to 8 digits"
        purpose = params.get("purpose", "")
        if purpose and purpose_key(purpose) not in PURPOSE_ZH:
            problems["params[purpose]"] = f"purpose must be one of {', '.join(PURPOSE_ZH)}"
    if kind == "CONSENT_RECEIPT":
        version = params.get("agreement_version", "")
        if version and not _AGREEMENT_VERSION.match(version):
            problems["params[agreement_version]"] = "agreement_version must be 1-32 of [0-9A-Za-z._-]"
    return problems


@dataclass(frozen=True)
class SmsTemplate:
    kind: str
    version: int
    template: Template

    @property
    def name(self) -> str:
        return f"{self.kind.lower()}.v{self.version}"

    def values(self, params: Mapping[str, str]) -> dict[str, str]:
        """The caller's parameters and what the text derives from them."""
        values = dict(params)
        if self.kind == "SMS_CODE":
            values["purpose_zh"] = PURPOSE_ZH[purpose_key(params["purpose"])]
            values["minutes"] = str(CODE_VALID_MINUTES)
        if self.kind == "REPORT_READY":
            values["days"] = str(REPORT_KEPT_DAYS)
        return values

    def render(self, params: Mapping[str, str]) -> str:
        return self.template.substitute(self.values(params))

    def vendor_params(self, params: Mapping[str, str]) -> tuple[str, ...]:
        """A vendor template's values, in order (they may hold a code: never logged)."""
        values = self.values(params)
        return tuple(values[name] for name in VENDOR_PARAMS[self.kind])


@dataclass(frozen=True)
class TemplateBook:
    """Every version of every kind: new messages take the newest, a message already recorded
    keeps the version it was recorded with (its record names it)."""

    newest: Mapping[str, SmsTemplate]
    named: Mapping[str, SmsTemplate]


def load_template_book(directory: Path = TEMPLATE_DIR) -> TemplateBook:
    """Fails at start-up when a kind has no template."""
    newest: dict[str, SmsTemplate] = {}
    named: dict[str, SmsTemplate] = {}
    for path in sorted(directory.glob("*.txt")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            continue
        kind = match["kind"].upper()
        if kind not in REQUIRED_PARAMS:
            continue
        template = SmsTemplate(
            kind, int(match["version"]), Template(path.read_text(encoding="utf-8").strip())
        )
        named[template.name] = template
        if kind not in newest or template.version > newest[kind].version:
            newest[kind] = template
    missing = sorted(set(REQUIRED_PARAMS) - set(newest))
    if missing:
        raise RuntimeError(f"no SMS template for {', '.join(missing)} in {directory}")
    return TemplateBook(newest, named)
