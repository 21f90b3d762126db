"""One way to write a file atomically: a reader sees the old file or the new one, never half.

The temporary file lives beside the target, is flushed and fsynced, then renamed over it; the
directory is fsynced so the rename survives a power cut. The result has the mode a plain
``open()`` would give (0o666 minus the umask), not ``mkstemp``'s 0600.

A failed write (disk full, no permission, ...) removes the temporary and raises a one-line
:class:`~backbone.runtime.errors.WriteError` naming the file; the old file is untouched. Only a
kill -9 (or power cut) leaves a temporary behind: :func:`remove_leftover_temporaries` deletes them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from backbone.runtime.errors import WriteError

logger = logging.getLogger(__name__)

# A temporary is ".<target name>.<mkstemp's 8 random characters>.tmp" beside the target.
TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_NAME = re.compile(r"\.(.+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary files (and not, say, ``notes.tmp``)."""
    return TEMPORARY_NAME.fullmatch(name) is not None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` that exists and is not a directory, if any."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


@contextlib.contextmanager
def saving(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while saving ``path`` into a one-line WriteError naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        path = Path(path)
        blocker = _file_in_the_way(path) if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
        if blocker is not None:
            reason = f"cannot save, {blocker} is a file, not a directory"
        else:
            text = exc.strerror or str(exc) or type(exc).__name__
            reason = f"{text[0].lower()}{text[1:]} while saving"
        raise WriteError(f"{path}: {reason}", path=str(path)) from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file and rename it to ``path``."""
    path = Path(path)
    with saving(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=TEMPORARY_SUFFIX, dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some file systems do not open directories
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    # Serialized in memory first: torch.save into a file handle swallows the handle's OSError (disk
    # full) and raises an unrelated RuntimeError ("unexpected pos ..."); plain writes keep the errno.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` whole or not at all: a failed write is cut back, so the file keeps whole lines."""
    path = Path(path)
    data = text.encode("utf-8")
    with saving(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(fd).st_size
        try:
            with os.fdopen(fd, "ab") as handle:
                handle.write(data)
        except OSError:
            with contextlib.suppress(OSError):  # read_metrics skips a torn last line anyway
                os.truncate(path, size)
            raise


def remove_leftover_temporaries(directory: str | Path, min_age_s: float = 0.0) -> tuple[int, int]:
    """Delete the temporaries killed atomic writes left in ``directory`` (not below it) and log how many.

    Returns ``(files, bytes)``. A temporary another process is writing would go too and its write
    fail: where other processes may write into ``directory`` (a shared proposal cache), pass
    ``min_age_s`` longer than any write takes, so only files untouched that long are deleted.
    """
    count = size = 0
    now = time.time()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(directory) as entries:
        for entry in entries:
            if not is_temporary_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):  # gone already, or not ours to delete: leave it
                info = entry.stat(follow_symlinks=False)
                if now - info.st_mtime < min_age_s:
                    continue
                length = info.st_size
                os.unlink(entry.path)
                count, size = count + 1, size + length
    if count:
        logger.info(
            "%s: removed %d temporary file(s) of interrupted writes (%.1f MB)", directory, count, size / 1e6
        )
    return count, size
