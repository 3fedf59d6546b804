"""No settings object or key holder shows a secret: built from an environment holding known
secrets, none of them appears in its repr, its str or a formatted log line of it."""

from __future__ import annotations

import base64
import logging

import pytest

from bank_connector.config import ConnectorConfig
from cardcheck.runtime.clock import ManualClock
from cardcheck.runtime.keys import load_keyring
from cardcheck.runtime.settings import Settings, redact_url
from gateway.config import GatewayConfig
from gateway.tencent_faceid import TencentFaceOptions, TencentFaceVerifier
from notifier.config import NotifierConfig
from notifier.providers import make_provider
from report_service.audit import AuditChain
from report_service.config import ReportServiceConfig

MASTER = bytes(range(32))
RETIRED = bytes(range(32, 64))
PG_PASSWORD = "Pg-Pass-5f3e9a"
REDIS_PASSWORD = "Redis-Pass-7c1d22"
WEBHOOK_SECRET = "Webhook-Secret-0b8e4f6a"
TENCENT_SECRET_ID = "AKIDTencentSecretId93c1"
TENCENT_SECRET_KEY = "Tencent-Secret-Key-4e7a2d"

ENV = {
    "CARDCHECK_MASTER_KEY": base64.b64encode(MASTER).decode(),
    "CARDCHECK_RETIRED_MASTER_KEYS": base64.b64encode(RETIRED).decode(),
    "CARDCHECK_DATABASE_URL": f"postgresql+psycopg://report_service:{PG_PASSWORD}@db.internal:5432/cardcheck",
    "CARDCHECK_REDIS_URL": f"redis://:{REDIS_PASSWORD}@redis.internal:6379/0",
    "CARDCHECK_SANDBOX": "false",
    "CARDCHECK_SMS_PROVIDER": "webhook",
    "CARDCHECK_SMS_WEBHOOK_URL": "https://sms.example.com/send",
    "CARDCHECK_SMS_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "CARDCHECK_FACE_PROVIDER": "tencent",
    "CARDCHECK_TENCENT_SECRET_ID": TENCENT_SECRET_ID,
    "CARDCHECK_TENCENT_SECRET_KEY": TENCENT_SECRET_KEY,
    "CARDCHECK_TENCENT_FACEID_RULE_ID": "1",
}

# Every form a key could take in text: base64 as configured, hex, the bytes' repr.
SECRETS = [PG_PASSWORD, REDIS_PASSWORD, WEBHOOK_SECRET, TENCENT_SECRET_ID, TENCENT_SECRET_KEY]
for key in (MASTER, RETIRED):
    SECRETS += [base64.b64encode(key).decode(), key.hex(), repr(key)[2:-1][:40]]


def _shown(thing: object) -> list[str]:
    record = logging.LogRecord("cardcheck", logging.INFO, __file__, 1, "built %s (%r)", (thing, thing), None)
    line = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s").format(record)
    return [repr(thing), str(thing), f"{thing}", line]


def _objects() -> dict[str, object]:
    settings = Settings.from_env(ENV)
    keyring = load_keyring(settings.master_key, settings.retired_master_keys, settings.data_dir)
    notifier = NotifierConfig.from_env(ENV)
    gateway = GatewayConfig.from_env(ENV)
    return {
        "settings": settings,
        "gateway config": GatewayConfig.from_env(ENV),
        "notifier config": notifier,
        "report_service config": ReportServiceConfig.from_env(ENV),
        "bank_connector config": ConnectorConfig.from_env(ENV),
        "keyring": keyring,
        "sealer": keyring.sealer("subject"),
        "keyed hash": keyring.hasher("phone"),
        "audit chain": AuditChain.from_keyring(keyring),
        "webhook provider": make_provider(notifier, settings, ManualClock()),
        "face provider options": TencentFaceOptions.from_config(gateway),
        "face provider": TencentFaceVerifier(TencentFaceOptions.from_config(gateway), None, ManualClock()),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("name", list(_objects()))
def test_no_secret_is_shown(name):
    thing = _objects()[name]
    for text in _shown(thing):
        for secret in SECRETS:
            assert secret not in text, f"{name} shows a secret: {text}"


def test_settings_still_say_what_is_configured():
    text = repr(Settings.from_env(ENV))
    assert "db.internal:5432/cardcheck" in text and "report_service:***@" in text
    assert "redis.internal:6379" in text and "master_key=<1 set>" in text
    assert "master_key=None" in repr(Settings.from_env({}))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:p%40ss@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://h:6380/0?password=pw&ssl_cert_reqs=none", "rediss://h:6380/0?password=%2A%2A%2A&ssl_cert_reqs=none"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/test", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        (None, None),
    ],
)
def test_a_url_is_shown_without_its_password(url, shown):
    assert redact_url(url) == shown
