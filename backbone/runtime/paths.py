"""Where run directories and the shared real data sets live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_root() -> Path:
    """``$SHARED_DATA``, defaulting to ``<repo>/../shared/data``."""
    return Path(os.environ.get("SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def resolve_data_path(value: str | Path) -> Path:
    """Expand ``$SHARED_DATA`` / ``${SHARED_DATA}`` (with its default) and ``~`` in a config path."""
    text = str(value)
    for token in ("${SHARED_DATA}", "$SHARED_DATA"):
        text = text.replace(token, str(shared_data_root()))
    return Path(os.path.expanduser(os.path.expandvars(text)))


def default_run_dir(config_path: str | Path | None, fallback: str) -> Path:
    """``runs/<config stem>`` (mmdetection's work_dirs convention), or ``runs/<fallback>``."""
    stem = Path(config_path).stem if config_path is not None else fallback
    return Path("runs") / stem


def link_escape(path: str | Path, root: str | Path) -> str | None:
    """Where ``path`` really leads when it is a symlink to a file outside ``root``, else None.

    A data set's files are read from inside its root. A symlinked *file* that leads out (e.g.
    ``a.jpg -> /home/user/.ssh/id_rsa`` in a downloaded archive) is refused by the callers;
    symlinked *folders* are followed: the root itself or a class folder may deliberately live on
    another disk (hence a link to a file in its own folder's real location is fine too).
    """
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    for allowed in (os.path.realpath(root), os.path.realpath(os.path.dirname(os.path.abspath(path)))):
        if os.path.commonpath([allowed, target]) == allowed:
            return None
    return target
