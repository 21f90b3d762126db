"""tools/demo.py --quick (the README's "--quick form in the suite"): the whole pipeline runs end to
end on synthetic scenes, writes everything the README lists, the detector learns, and a second run
on the same --out reuses every stage and says so; rewritten scenes retrain what learns from them.

The quick run costs minutes (three training tools in subprocesses), so it runs once per module and
the tests read its output."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from tool_loader import load_tool

from backbone.runtime.log import read_metrics, run_tool
from detect.datasets.synthetic import annotation_path, image_root

demo = load_tool("demo")

STAGES = ("pretrain", "multibox", "detector")
NUM_SHAPES = 8  # backbone.synthetic.SHAPE_CLASSES


def run_demo(out: Path) -> int:
    """``python tools/demo.py --quick --out OUT`` in-process (a UserError becomes exit code 2)."""
    return run_tool(demo.main, demo.get_args_parser().parse_args(["--quick", "--out", str(out)]))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first quick run; its timings and model files' mtimes are kept before a second run
    (which rewrites timings.json) can touch them."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    code = run_demo(out)
    timings_path = out / "timings.json"
    return {
        "out": out,
        "code": code,
        "timings": json.loads(timings_path.read_text()) if timings_path.is_file() else None,
        "models": {
            s: (out / s / "model.pt").stat().st_mtime_ns for s in STAGES if (out / s / "model.pt").is_file()
        },
    }


def epoch_records(run_dir: Path) -> list[dict]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    assert records, f"no epoch record in {run_dir / 'metrics.jsonl'}"
    return records


def test_quick_demo_runs_end_to_end_and_the_detector_learns(first_run: dict) -> None:
    out = first_run["out"]
    assert first_run["code"] == 0

    # Every stage's output.
    for split in ("train", "val"):
        assert annotation_path(out / "scenes", split).is_file()
        assert any(image_root(out / "scenes", split).iterdir()), split
    for stage in STAGES:
        assert (out / stage / "model.pt").is_file(), stage
        assert (out / stage / "curves.png").is_file(), stage

    # The evaluation: VOC mAP@0.5 and COCO AP as numbers in [0, 1].
    summary = json.loads((out / "detector" / "eval_val.json").read_text())
    voc, coco = summary["voc"]["mAP"], summary["coco"]["stats"]["AP"]
    for value in (voc, coco):
        assert isinstance(value, float) and 0.0 <= value <= 1.0, summary

    # Pictures: one per validation scene (ground truth beside detections), and the PR curves.
    val_images = json.loads(annotation_path(out / "scenes", "val").read_text())["images"]
    pictures = sorted(p.stem for p in (out / "detections").glob("*.png"))
    assert pictures == sorted(Path(image["file_name"]).stem for image in val_images[:8])  # the first 8
    assert list((out / "detector" / "pr_val").glob("*.png"))

    # timings.json: seconds per stage, each stage really run this time.
    timings = dict(first_run["timings"])
    assert timings.pop("reused") == []
    assert set(timings) == {"scenes", *STAGES, "total"}
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in timings.values()), timings
    assert all(timings[s] > 0 for s in STAGES), timings

    # The detector learns. Its train_loss is softmax cross-entropy over C + 1 = 9 outputs plus 0.3 x
    # each of the two aux heads' (engine.rcnn_step), so uniform outputs would give 1.6 ln 9 = 3.52.
    # Measured here: 6.03 in epoch 1 (the new heads start far from uniform), 3.71 in epoch 2. Two
    # epochs of 8 steps do not get below 3.52, so "below the untrained loss" cannot be asserted; a
    # fall from the first epoch's mean to the last's (40% here, noise is a few %) is the robust signal.
    detector = epoch_records(out / "detector")
    assert len(detector) >= 2
    first, last = detector[0]["train_loss"], detector[-1]["train_loss"]
    assert math.isfinite(last) and last < first, (first, last)

    # Pretraining: --quick's 2 epochs of 16 steps are too few for it to learn, and no training
    # signal says otherwise: train_loss_main stayed at chance, ln 8 = 2.08 (measured 2.12 -> 2.24,
    # train top-1 13.9% -> 9.6%; the lead's 4096-image pilots left chance only after ~400 steps). So
    # this checks only that it trained without diverging; showing it learn would need minutes more.
    pretrain = epoch_records(out / "pretrain")
    assert len(pretrain) >= 2
    for record in pretrain:
        assert math.isfinite(record["train_loss"]), record
        assert record["train_loss_main"] < 2 * math.log(NUM_SHAPES), record
    assert epoch_records(out / "multibox")


def test_second_run_reuses_every_stage(first_run: dict, caplog: pytest.LogCaptureFixture) -> None:
    out = first_run["out"]
    assert first_run["code"] == 0
    with caplog.at_level(logging.INFO, logger="demo"):
        assert run_demo(out) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "demo"]
    for stage in STAGES:
        # "STAGE: reusing OUT/STAGE/model.pt ..." and never "STAGE: tools/TOOL.py ..." (a started tool).
        said = [m for m in messages if m.startswith(f"{stage}: ")]
        assert said and all(m.startswith(f"{stage}: reusing ") for m in said), (stage, messages)
        assert (out / stage / "model.pt").stat().st_mtime_ns == first_run["models"][stage], stage
    # The reused stages report the seconds they took when built.
    timings = json.loads((out / "timings.json").read_text())
    assert timings["reused"] == list(STAGES)
    assert all(timings[s] == first_run["timings"][s] for s in STAGES), timings
    assert (out / "detector" / "eval_val.json").is_file()


def test_rewritten_scenes_retrain_multibox_and_the_detector(
    first_run: dict, caplog: pytest.LogCaptureFixture
) -> None:
    # A new generator version rewrites the scenes (FORMAT_VERSION); deleting the train split's JSON
    # rewrites it the same way. Pretraining never sees the scenes and stays reused.
    out = first_run["out"]
    assert first_run["code"] == 0
    annotation_path(out / "scenes", "train").unlink()
    with caplog.at_level(logging.INFO, logger="demo"):
        assert run_demo(out) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "demo"]
    assert any(m.startswith("detector: deleting ") and "proposals" in m for m in messages), messages
    timings = json.loads((out / "timings.json").read_text())
    assert timings["reused"] == ["pretrain"], timings
    for stage in ("multibox", "detector"):
        assert (out / stage / "model.pt").stat().st_mtime_ns != first_run["models"][stage], stage
