"""The data directory and what is in it (keys, SQLite files, span files) are for the service's
own user alone: the directory 0700, the files 0600.

Each is created with that mode (mkdir's and os.open's mode, so there is no moment when another
user could open it), and one found looser at start, made earlier by hand or by an older release,
is tightened and logged. Directories above the data directory are the operator's: their modes
are left alone."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode:
        try:
            path.chmod(current & mode)
        except PermissionError:  # not ours (a shared directory named as the data directory)
            log.warning("%s is mode %o, open to other users, and cannot be made %o", path, current, current & mode)
            return
        log.warning("%s was mode %o, open to other users: now %o", path, current, current & mode)


def private_directory(path: Path) -> Path:
    """`path` made (its missing parents as the umask makes them) with mode 0700, or tightened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=DIRECTORY_MODE)
    except FileExistsError:
        _tighten(path, DIRECTORY_MODE)
    return path


def private_file(path: Path) -> Path:
    """`path` created empty with mode 0600 if missing, else tightened; its directory is not
    touched."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        _tighten(path, FILE_MODE)
    return path


def tighten_if_present(path: Path) -> None:
    """A file someone else creates (SQLite's -wal and -shm), tightened if it is there."""
    try:
        _tighten(path, FILE_MODE)
    except FileNotFoundError:
        pass


def write_new_private(path: Path, text: str) -> None:
    """Writes a new file (FileExistsError if there is one) readable by this user alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
