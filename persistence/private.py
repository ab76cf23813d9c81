"""Local state private to the service user: folders created 0700, files 0600; shared ones are reported, not changed.

The data folder holds the key pepper, the SQLite database (key digests, usage, prompts when they are stored) and the
built-in demo model. What this process creates is private from the first byte (no window in which another user
could open it). What already exists keeps its mode: it may be an operator's own folder, shared with a backup group
on purpose, and silently tightening it could break that. A folder or file that other users can reach gets one
warning per process naming the path and the fix.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = (
    "DIR_MODE",
    "FILE_MODE",
    "SQLITE_SIDE_FILES",
    "private_dir",
    "private_file",
    "private_sqlite_file",
    "shared_mode",
    "warn_if_shared",
)

log = logging.getLogger("persistence.private")

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
"""Files SQLite keeps beside a database; it creates them with the database file's own mode."""

_warned: set[Path] = set()


def shared_mode(path: Path) -> int | None:
    """The mode of ``path`` when its group or other users have any access to it, else ``None`` (also if missing)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None


def warn_if_shared(path: Path, what: str) -> None:
    """One warning per process and path when ``path`` is open to other users (naming the ``chmod`` that fixes it)."""
    mode = shared_mode(path)
    if mode is None or path in _warned:
        return
    _warned.add(path)
    fix = DIR_MODE if path.is_dir() else FILE_MODE
    log.warning(
        "%s %s is accessible to other users (mode %03o); it is left as it is: run `chmod %03o %s` unless that is "
        "intended",
        what,
        path,
        mode,
        fix,
        path,
    )


def private_dir(path: str | Path, what: str = "the folder") -> Path:
    """Create ``path`` with mode 0700 (missing parents with the default mode); warn if it existed and is shared.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        warn_if_shared(path, what)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return private_dir(path, what)
    else:
        os.chmod(path, DIR_MODE)  # exact, whatever the umask
    return path


def private_file(path: str | Path, what: str = "the file") -> bool:
    """Create ``path`` empty with mode 0600 unless it exists (then warn if shared). Whether it was created here.

    The file is created with its final mode in one ``open`` (``O_EXCL``), so it is never readable by others, even
    for a moment; a process that loses the race to create it uses the other's.
    """
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        warn_if_shared(path, what)
        return False
    os.close(fd)
    return True


def private_sqlite_file(path: str | Path) -> None:
    """Make a new SQLite database file private before SQLite opens it (its -wal/-shm/-journal files follow its mode).

    Its folder is created 0700 when missing; an existing database, folder or side file open to others is reported.
    """
    path = Path(path).expanduser()
    parent = path.parent
    if not parent.exists():
        private_dir(parent, "the database folder")
    private_file(path, "the SQLite database")
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            warn_if_shared(side, "the SQLite file")
