"""The one writer: every file onnxprune writes (model, external data, report, plan) goes here.

A target is checked before any work starts (:func:`check_target`): its folder exists, is a
folder and takes a new file, the name is valid, the target is not a directory and is not
one of the files the run reads (the input model, its external data). Writing goes to a
temporary *file* beside the target, ``.onnxprune-<pid>-<token>.tmp``, renamed over the
target only when complete (:class:`Transaction` commits several files together). Temporary
files are removed on any error, on SIGINT and SIGTERM (:func:`handle_signals`), and those a
killed run left behind (its process is gone) are removed by the next run that writes there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from onnxprune.errors import UserError

TEMP_PREFIX = ".onnxprune-"
#: Temporary folders of versions before the one writer (no process id in their name) are
#: stale once this old.
_LEGACY_AGE_S = 3600.0
#: Temporary files of this process not yet renamed into place (removed on SIGINT/SIGTERM).
_LIVE: set[Path] = set()


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived: unwinds like Ctrl-C, so every temporary file is removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: The signals that arrived (see :func:`interrupted_by`).
_RECEIVED: list[int] = []


#: Set once the run has returned its exit code (:func:`release_signals`): a signal after that
#: has nothing left to unwind and takes its default action.
_RELEASED: list[bool] = []


def _on_signal(signum, frame):  # pragma: no cover - exercised through subprocesses
    if _RELEASED:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _RECEIVED.append(signum)
    remove_live_temporaries()
    raise Interrupted(signum)


def interrupted_by() -> int | None:
    """The signal that interrupted this run, if one did. The :class:`Interrupted` it raised may
    not come back as itself: raised while a C extension initialises (onnxruntime imported
    mid-run), it surfaces as that module's ``ImportError: initialization failed``."""
    return _RECEIVED[0] if _RECEIVED else None


def handle_signals() -> None:
    """SIGTERM and SIGHUP unwind the run like Ctrl-C does (temporary files removed, exit 128+N)."""
    _RELEASED.clear()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main thread, or no such signal here
            pass


def release_signals() -> None:
    """The run is over (its exit code decided): a later SIGTERM/SIGHUP ends the process the
    default way instead of raising where nothing catches it."""
    _RELEASED.append(True)


def remove_live_temporaries() -> None:
    for path in list(_LIVE):
        _unlink(path)
        _LIVE.discard(path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (through links, relative paths, case-folding)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return Path(os.path.realpath(a)) == Path(os.path.realpath(b))
    except OSError:
        return False


def check_target(path: str | os.PathLike, what: str, *, protect: Iterable[Path] = (),
                 suffixes: tuple[str, ...] = ("",)) -> Path:
    """Refuse, with a UserError naming ``what`` (e.g. "--report"), a target that cannot be
    written or would overwrite a file in ``protect``; ``suffixes`` are the companion files
    written beside it (``.data``). Leaves nothing behind; returns the path."""
    path = Path(path)
    if not path.name or path.name in (".", "..") or str(path).endswith(os.sep):
        raise UserError(f"{what} '{path}': not a file name")
    folder = path.parent
    if not folder.exists():
        raise UserError(f"{what} '{path}': the folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{what} '{path}': {folder} is not a folder")
    longest = max(len((path.name + s).encode()) for s in suffixes)
    if longest > _name_max(folder):
        raise UserError(f"{what} '{path.name[:40]}...': the file name is too long ({longest} bytes, "
                        f"at most {_name_max(folder)})")
    if path.is_dir():
        raise UserError(f"{what} '{path}': is a directory")
    if path.exists() and not path.is_file():
        raise UserError(f"{what} '{path}': exists and is not a regular file")
    for other in protect:
        for suffix in suffixes:
            target = path.with_name(path.name + suffix)
            if same_file(target, Path(other)):
                raise UserError(f"{what} '{target}' would overwrite {other}, which this run reads")
    probe = _temporary(folder)
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except OSError as exc:
        raise UserError(f"{what} '{path}': cannot write in {folder}: {exc.strerror}") from None
    finally:
        _unlink(probe)
    return path


def _temporary(folder: Path) -> Path:
    return folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove what killed runs left in ``folder``: temporaries whose process is gone, and
    temporary folders of earlier versions older than an hour. Returns what it removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        stem = entry.name[len(TEMP_PREFIX):]
        pid = stem.split("-", 1)[0]
        try:
            if entry.is_file() and entry.name.endswith(".tmp") and pid.isdigit():
                stale = int(pid) != os.getpid() and not _alive(int(pid))
            else:  # a folder of the writer this one replaced: .onnxprune-XXXXXXXX
                stale = entry.is_dir() and time.time() - entry.stat().st_mtime > _LEGACY_AGE_S
        except OSError:
            continue
        if stale:
            _unlink(entry)
            removed.append(entry)
    return removed


class Transaction:
    """Files written together: each to a temporary beside its target, renamed into place by
    :meth:`commit` (companions first, the main file last), all removed on failure.

        with Transaction() as tx:
            write(tx.temporary(path))
            tx.commit()
    """

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []

    def temporary(self, target: str | os.PathLike) -> Path:
        target = Path(target)
        folder = target.parent
        remove_stale_temporaries(folder)
        temp = _temporary(folder)
        _LIVE.add(temp)
        self._pending.append((temp, target))
        return temp

    def discard(self, temp: Path) -> None:
        """Drop a temporary this transaction turned out not to need."""
        self._pending = [(t, target) for t, target in self._pending if t != temp]
        _unlink(temp)
        _LIVE.discard(temp)

    def commit(self) -> list[Path]:
        """Rename every temporary over its target; returns the targets, in order written."""
        done = []
        for temp, target in self._pending:
            try:
                os.replace(temp, target)
            except OSError as exc:
                raise UserError(f"cannot write {target}: {exc.strerror}") from None
            _LIVE.discard(temp)
            done.append(target)
        self._pending = []
        return done

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        for temp, _ in self._pending:
            _unlink(temp)
            _LIVE.discard(temp)
        self._pending = []
        if isinstance(exc, OSError):
            raise UserError(f"cannot write: {exc.strerror or exc}") from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with Transaction() as tx:
        tx.temporary(path).write_text(text)
        return tx.commit()[0]
