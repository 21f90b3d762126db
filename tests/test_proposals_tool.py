"""tools/propose.py end to end on a tiny COCO data set: caches, the coverage report, user errors."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_proposals_cache import make_multibox_file, write_images
from tool_loader import load_tool

from backbone.runtime.errors import UserError
from detect.datasets import DetectionDataset, write_coco_json
from detect.proposals.report import best_overlaps, coverage_stats

REPO = Path(__file__).resolve().parents[1]


def tiny_dataset(tmp_path: Path) -> Path:
    records = write_images(tmp_path / "images", 4)
    for i, record in enumerate(records):
        record.boxes = np.array([[8 + i, 8, 60 + i, 50], [64, 40, 120, 90]], np.float32)
        record.labels = np.array([0, 1], np.int64)
        record.difficult = np.zeros(2, bool)
    path = tmp_path / "tiny.json"
    write_coco_json(
        DetectionDataset(records, ["a", "b"], [1, 2], "tiny"), path, image_root=tmp_path / "images"
    )
    return path


def write_config(tmp_path: Path, **extra: object) -> Path:
    config = {
        "name": "tiny",
        "splits": {"test": {"path": str(tiny_dataset(tmp_path))}},
        "method": "ss",
        "ss": {"preset": "fast_x2", "min_size": 4},
        "cache_dir": str(tmp_path / "cache"),
        "workers": 2,
        "shard_size": 2,
        **extra,
    }
    path = tmp_path / "propose.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


propose = load_tool("propose")


def run_in_process(*args: str) -> int:
    return propose.main(propose.get_args_parser().parse_args(list(args)))


def test_report_compares_the_four_methods(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    make_multibox_file(tmp_path / "mb.pth", seed=0)
    # min_size 0: the untrained head's boxes may clip small, and this test counts top_k of them.
    multibox = {"model": str(tmp_path / "mb.pth"), "top_k": 5, "min_size": 0}
    config = write_config(tmp_path, multibox=multibox)
    assert (
        run_in_process("--config", str(config), "--split", "test", "--report", "--out", str(tmp_path / "rep"))
        == 0
    )
    assert "target" not in capsys.readouterr().out  # a benchmark's verdict, not the tool's
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["methods"]) == {
        "SS fast",
        "SS fast_x2",
        "MultiBox",
        "SS fast_x2 + MultiBox",
        "SS fast (dedup 0.8, reference)",
    }
    assert report["methods"]["MultiBox"]["proposals_per_image"] == 5
    assert "target" not in report
    assert (tmp_path / "rep" / "recall_curves.png").stat().st_size > 1000
    assert "recall@0.5" in (tmp_path / "rep" / "report.txt").read_text()
    caches = sorted(p.name for p in (tmp_path / "cache" / "tiny" / "test").iterdir())
    assert caches == ["multibox_top5", "multibox_top5+ss_fast_x2", "ss_fast", "ss_fast_x2"]
    with caplog.at_level(logging.INFO):
        assert run_in_process("--config", str(config), "--split", "test", "--no-progress") == 0
    assert "0 shards computed, 2 reused" in caplog.text  # method ss: the cache is reused


@pytest.mark.parametrize("method", ["ss", "both"])
def test_report_without_a_multibox_model_covers_selective_search(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path, method=method, multibox={"model": None})
    out = tmp_path / "rep"
    assert run_in_process("--config", str(config), "--split", "test", "--report", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"SS fast", "SS fast_x2", "SS fast (dedup 0.8, reference)"}
    assert report["notes"] == ["no multibox.model: MultiBox rows left out"]
    assert sorted(p.name for p in (tmp_path / "cache" / "tiny" / "test").iterdir()) == [
        "ss_fast",
        "ss_fast_x2",
    ]
    # A model named but not trained yet: the selective search rows all the same, and a warning naming it.
    missing = tmp_path / "nope.pth"
    out = tmp_path / "rep_missing"
    with caplog.at_level(logging.WARNING):
        assert (
            run_in_process(
                "--config", str(config), "--split", "test", "--report", "--out", str(out),
                "--set", f"multibox.model={missing}",
            )
            == 0
        )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"SS fast", "SS fast_x2", "SS fast (dedup 0.8, reference)"}
    expected = f"{missing}: MultiBox model file not found"
    assert expected in caplog.text
    assert f"note: {expected}" in (out / "report.txt").read_text()


def test_report_needs_the_model_only_for_its_rows(tmp_path: Path) -> None:
    # Without --report the configured method is what is asked for: a missing model stays an error.
    config = write_config(tmp_path, method="both", multibox={"model": str(tmp_path / "nope.pth")})
    with pytest.raises(UserError, match=re.escape("nope.pth: MultiBox model file not found")):
        run_in_process("--config", str(config), "--split", "test")


def test_dataset_log_lines_are_readable_and_name_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path)
    coco = json.loads((tmp_path / "tiny.json").read_text())
    coco["annotations"][0]["bbox"] = [100, 8, 60, 40]  # past the 128 px width: clipped when read
    (tmp_path / "tiny.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.INFO):
        assert run_in_process("--config", str(config), "--split", "test", "--no-progress") == 0
    assert "tiny/test: 4 images" in caplog.text
    assert re.search(r"tiny\.json: boxes clipped to the image: 1 \(\S", caplog.text)  # with the file
    assert "LoadReport(" not in caplog.text  # no raw dataclass repr


def test_config_keys_are_the_proposal_spec_at_the_top_level(tmp_path: Path) -> None:
    from backbone.runtime.config import load_config
    from detect.proposals.spec import MultiBoxSpec, ProposalSpec, SelectiveSearchSpec

    cfg = load_config(write_config(tmp_path, union_dedup_iou=0.6), propose.ProposeConfig)
    assert cfg.proposals() == ProposalSpec(
        method="ss",
        ss=SelectiveSearchSpec(preset="fast_x2", min_size=4),
        multibox=MultiBoxSpec(),
        union_dedup_iou=0.6,
        cache_dir=str(tmp_path / "cache"),
        workers=2,
        shard_size=2,
    )
    # The tool's defaults are today's: both, dedup 0.8, cache/proposals.
    defaults = propose.ProposeConfig().proposals()
    assert (defaults.method, defaults.union_dedup_iou, defaults.cache_dir) == ("both", 0.8, "cache/proposals")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "val"], "--split val: not in the config's splits (test)"),
        (["--split", "test", "--set", "ss.preset=slowest"], "unknown selective search preset"),
        (["--split", "test", "--set", "method=both"], "multibox.model: no MultiBox model file given"),
        (["--split", "test", "--set", "ss.min_sz=3"], "unknown key 'ss.min_sz'"),
    ],
)
def test_user_errors(tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        run_in_process("--config", str(write_config(tmp_path)), *args)


def test_user_error_exits_2_with_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "tools/propose.py", "--config", str(write_config(tmp_path)), "--split", "train"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["error: --split train: not in the config's splits (test)"]


def test_coverage_stats_hand_worked() -> None:
    from detect.datasets.records import DetectionRecord

    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 4, 4]], np.float32)
    record = DetectionRecord(1, "x.png", 40, 40, gt, np.array([0, 0, 1]), np.array([False, False, True]))
    proposals = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    best = best_overlaps(gt[:2], proposals, [1, 2, 3])
    np.testing.assert_allclose(best, [[0.5, 0.5, 1.0], [0.0, 1.0, 1.0]])
    stats = coverage_stats([record], [proposals], np.array([0.25]), counts=(1, 2))
    assert stats["gt_boxes"] == 2  # the difficult box is not counted
    assert stats["recall@0.5"] == 1.0 and stats["recall@0.7"] == 1.0
    assert stats["curve@0.5"] == {"1": 0.5, "2": 1.0} and stats["curve@0.7"] == {"1": 0.0, "2": 0.5}
    assert stats["mabo"] == 1.0 and stats["proposals_per_image"] == 3 and stats["seconds_per_image"] == 0.25
