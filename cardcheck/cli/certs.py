"""`cardcheck certs`: the development CA and each identity's certificate and key in
CARDCHECK_DATA_DIR/tls (cardcheck/runtime/certs.py says what is in them). `cardcheck up --tls`
makes them when missing."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

from cardcheck.runtime.certs import missing, write_development_set
from cardcheck.runtime.settings import Settings, SettingsError


def tls_dir_of(settings: Settings) -> Path:
    return settings.tls_dir or settings.data_dir / "tls"


def run(data_dir: Path | None, renew: bool) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"cardcheck certs: {error}", file=sys.stderr)
        return 2
    if data_dir is not None:
        settings = settings.replace(data_dir=data_dir)
    directory = tls_dir_of(settings)
    if not renew and not missing(directory):
        print(f"the development certificates are all in {directory} (--renew issues them again)")
        return 0
    written = write_development_set(directory, datetime.now(UTC), renew=renew)
    print(f"wrote {len(written)} files to {directory}: ca.pem and, for each identity, NAME.pem and NAME.key "
          "(keys 0600); banks/ holds the simulated banks' CA and certificates")
    return 0
