"""backbone.runtime.log: metrics.jsonl, curves PNG, the user-error exit path."""

from __future__ import annotations

import errno
import io
import json
import logging
import os

from backbone.runtime.errors import UserError
from backbone.runtime.log import MetricsWriter, plot_curves, read_metrics, run_tool, setup_logging


def test_metrics_writer_truncates_history_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for step in (10, 20, 30):
        writer.write({"kind": "train", "step": step, "loss": 1.0 / step, "nan": float("nan")})
    with path.open("a") as handle:
        handle.write('{"kind": "train", "st')  # a writer killed mid-line
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]
    assert read_metrics(path)[0]["nan"] == "nan"  # kept visible, and the file stays valid JSON
    MetricsWriter(path, keep_until_step=20).write({"kind": "train", "step": 25})
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 25]
    MetricsWriter(path)  # a fresh run starts a fresh file
    assert read_metrics(path) == []


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "train", "step": s, "epoch_float": s / 4, "loss": 2 - s / 8, "lr": 0.1} for s in range(1, 9)
    ]
    records += [
        {"kind": "epoch", "step": 4 * e, "epoch_float": e, "val_top1": 40.0 + e, "val_loss": 1.0}
        for e in (1, 2)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    png = tmp_path / "curves.png"
    plot_curves(path, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_run_tool_turns_user_error_into_one_line_and_exit_code_2(capsys):
    def failing(args):
        raise UserError("configs/x.yaml: unknown key 'train.lrr'")

    assert run_tool(failing, None) == 2
    err = capsys.readouterr().err
    assert err == "error: configs/x.yaml: unknown key 'train.lrr'\n"
    assert run_tool(lambda args: 3, None) == 3 and run_tool(lambda args: None, None) == 0


class FullDisk(io.StringIO):
    """A log file's stream on a full disk: writing fails, and so does closing (the unwritten buffer)."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        super().close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_log_txt_warns_once_and_the_console_log_goes_on(tmp_path, capsys):
    setup_logging(tmp_path)
    root = logging.getLogger()
    try:
        ours = [h for h in root.handlers if getattr(h, "_backbone_handler", False)]
        (file_handler,) = [h for h in ours if isinstance(h, logging.FileHandler)]
        logging.getLogger("backbone").info("before")
        file_handler.stream.close()
        file_handler.stream = FullDisk()
        for step in (1, 2, 3):
            logging.getLogger("backbone").info("step %d", step)
    finally:
        setup_logging(None)  # closes the run's handlers, which must not raise either
        for handler in [h for h in root.handlers if getattr(h, "_backbone_handler", False)]:
            root.removeHandler(handler)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'log.txt'}: no space left on device while logging; logging to the console only"
    ]
    assert "Traceback" not in err and "Logging error" not in err
    assert all(f"step {step}" in err for step in (1, 2, 3))
    assert "before" in (tmp_path / "log.txt").read_text()
