"""Run-directory logging: tqdm progress, metrics.jsonl, training-curve PNG, user-error exits.

Everything that writes is a no-op on ranks other than 0, so callers need no rank checks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from backbone.runtime.dist import is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.files import append_text, atomic_write, atomic_write_text

T = TypeVar("T")
logger = logging.getLogger("backbone")


def run_tool(main: Callable[[Any], int | None], args: Any) -> int:
    """Call a tool's ``main(args)`` and return its exit code; a :class:`UserError` becomes one
    stderr line and exit code 2. Use as ``sys.exit(run_tool(main, get_args_parser().parse_args()))``."""
    try:
        return int(main(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def setup_logging(run_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr (rank 0) and, when given, to ``run_dir/log.txt`` (appending across resumes)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_backbone_handler", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    if not is_main_process():
        return
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(_RunLogFile(Path(run_dir) / "log.txt", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._backbone_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)


class _RunLogFile(logging.FileHandler):
    """``log.txt``: a failed write (disk full) is one warning on stderr, not logging's traceback per
    record; the file log stops and the run goes on logging to the console (its next checkpoint
    save then stops it with a one-line WriteError if the disk is still full)."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.failed = True
        text = error.strerror or str(error) or type(error).__name__
        print(
            f"warning: {self.baseFilename}: {text[0].lower()}{text[1:]} while logging; "
            "logging to the console only",
            file=sys.stderr,
        )
        stream, self.stream = self.stream, None  # type: ignore[assignment]
        with contextlib.suppress(OSError, ValueError):  # its unwritten buffer fails again on close
            stream.close()


class Progress:
    """tqdm bar over an iterable (rank 0 only) showing loss, lr and images/s (summed over ranks)."""

    def __init__(
        self,
        iterable: Iterable[T],
        total: int | None,
        desc: str,
        initial: int = 0,
        world_size: int = 1,
        disable: bool | None = None,
    ) -> None:
        self.world_size = world_size
        self._images = 0
        self._start = time.perf_counter()
        self.bar = tqdm(
            iterable,
            total=total,
            initial=initial,
            desc=desc,
            dynamic_ncols=True,
            leave=True,
            disable=(not is_main_process()) if disable is None else disable,
            file=sys.stderr,
            mininterval=1.0,
        )

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bar)

    def update(self, batch_images: int, **metrics: float) -> None:
        """Record one step of ``batch_images`` images on this rank and refresh the postfix."""
        self._images += batch_images
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()}
        shown["img/s"] = f"{self.images_per_second():.1f}"
        self.bar.set_postfix(shown, refresh=False)

    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self._images * self.world_size / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        self.bar.close()


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only).

    On resume, ``keep_until_step`` drops records written after the checkpoint being resumed from
    (e.g. by a run killed without a checkpoint), so the file describes one consistent history.
    """

    def __init__(self, path: str | Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        if not is_main_process():
            return
        if keep_until_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if not is_main_process():
            return
        clean = {k: _json_number(v) for k, v in record.items()}
        append_text(self.path, json.dumps(clean) + "\n")


def _json_number(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping them
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file; a torn last line (killed writer) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training curves from metrics.jsonl: train loss, learning rate, and every ``val_*`` metric.

    Records with ``"kind": "train"`` (per log interval) and ``"kind": "epoch"`` (per epoch) are
    plotted against fractional epoch.
    """
    if not is_main_process():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    val_keys = sorted({k for r in epochs for k in r if k.startswith("val_") and _is_number(r[k])})
    panels = [("loss", "train loss"), ("lr", "learning rate")] + [(k, k) for k in val_keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for rows, style, label in ((train, "-", "per interval"), (epochs, "o-", "per epoch")):
            points = [
                (r["epoch_float"], r[key]) for r in rows if "epoch_float" in r and _is_number(r.get(key))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda handle: fig.savefig(handle, format="png", dpi=90))
    finally:
        plt.close(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
