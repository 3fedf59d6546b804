"""`cardcheck keys rotate` and `cardcheck keys rewrap`: a master key rotation on the embedded
default, where every service reads the key file under one data directory.

rotate retires keys/master.key (to keys/retired/) and makes a new one; restarted services seal
and hash everything new under it and still open what the old one sealed. rewrap then runs each
stateful service's own rewrap command, after which keys/retired can be destroyed. At scale the
Secret is rotated instead: the new key in `master-key`, the old one in `retired-master-keys`."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from cardcheck.runtime.keys import rotate_master_key
from cardcheck.runtime.settings import Settings, SettingsError

REWRAPPED = ("gateway", "notifier", "report_service")


def _data_dir(data_dir: Path | None) -> Path:
    return data_dir or Settings.from_env().data_dir


def rotate(data_dir: Path | None) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"cardcheck keys: {error}", file=sys.stderr)
        return 2
    if settings.master_key:
        print("CARDCHECK_MASTER_KEY is set: rotate it where it comes from (the new key there, the old one in "
              "CARDCHECK_RETIRED_MASTER_KEYS), not here", file=sys.stderr)
        return 2
    directory = data_dir or settings.data_dir
    try:
        retired = rotate_master_key(directory, datetime.now(UTC))
    except FileNotFoundError as error:
        print(f"cardcheck keys: {error}", file=sys.stderr)
        return 2
    print(f"new master key in {directory / 'keys' / 'master.key'}; the old one retired to {retired}.")
    print("Restart the services, then run `cardcheck keys rewrap`; after it, keys/retired can be destroyed.")
    return 0


def rewrap_all(data_dir: Path | None) -> int:
    """Each service's rewrap in turn, in its own process; the first that fails stops the rest."""
    env = dict(os.environ)
    if data_dir is not None:
        env["CARDCHECK_DATA_DIR"] = str(data_dir)
    for service in REWRAPPED:
        done = subprocess.run([sys.executable, "-m", f"{service}.rewrap"], env=env)
        if done.returncode != 0:
            return done.returncode
    print(f"everything is under the current key: {_data_dir(data_dir) / 'keys' / 'retired'} can be destroyed")
    return 0
