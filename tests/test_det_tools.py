"""tools/convert_dataset.py and tools/eval_det.py: outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO_ROOT
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backbone.runtime import run_tool
from detect.datasets import read_coco


def load_tool(name: str) -> ModuleType:
    # tools/ holds scripts, not a package: load the file itself, independent of the working directory.
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_dataset = load_tool("convert_dataset")
eval_det = load_tool("eval_det")
XML = (
    "<annotation><size><width>0</width><height>0</height></size>{}</annotation>",
    "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>",
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "set"
    root.mkdir()
    objects = {
        "p1": [("pear", 1, 1, 30, 30)],
        "p2": [("plum", 5, 5, 40, 20), ("pear", 20, 20, 60, 45)],
        "p3": [],
    }
    for stem, objs in objects.items():
        Image.new("RGB", (64, 48)).save(root / f"{stem}.jpg")
        body = "".join(XML[1].format(*obj) for obj in objs)
        (root / f"{stem}.xml").write_text(XML[0].format(body))
    return root


def write_dets(path: Path, dets: list[dict]) -> Path:
    path.write_text(json.dumps(dets))
    return path


PERFECT = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 30], "score": 0.9},
    {"image_id": 2, "category_id": 2, "bbox": [4, 4, 36, 16], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [19, 19, 41, 26], "score": 0.7},
    {"image_id": 3, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.1},  # false positive, ranked last
]


def run(module: ModuleType, argv: list[str]) -> int:
    return run_tool(module.main, module.get_args_parser().parse_args(argv))


def test_convert_then_read_back(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "set.json"
    run(convert_dataset, [str(folder), "--out", str(out)])
    assert "3 images, 3 boxes, 2 classes" in capsys.readouterr().out
    dataset, report = read_coco(out)
    assert dataset.class_names == ["pear", "plum"] and len(dataset.records) == 3
    assert report.count("size_zero_fixed") == 0  # the converted file carries the real sizes
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [0.0, 0.0, 30.0, 30.0]


@pytest.mark.parametrize("metric", ["voc07", "voc", "ilsvrc", "coco"])
def test_eval_det_table_json_and_curves(folder: Path, tmp_path: Path, capsys, metric: str) -> None:
    dets = write_dets(tmp_path / "dets.json", PERFECT)
    out = tmp_path / f"eval_{metric}"
    run(eval_det, ["--gt", str(folder), "--dets", str(dets), "--metric", metric, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "pear" in printed and f"mAP ({metric})" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == metric and metrics["num_images"] == 3
    if metric != "coco":
        # Every object found before the false positive (11 x 1/11 in floating point for voc07).
        assert metrics["mAP"] == pytest.approx(1.0, abs=1e-15)
        plum = metrics["per_class"]["plum"]
        assert (plum["num_positives"], plum["num_detections"]) == (1, 2) and plum["AP"] == pytest.approx(1.0)
    assert sorted(p.name for p in (out / "pr").glob("*.png")) == ["pr_000_pear.png", "pr_001_plum.png"]


def test_eval_det_on_coco_gt_matches_pycocotools(folder: Path, tmp_path: Path) -> None:
    gt = tmp_path / "gt.json"
    run(convert_dataset, [str(folder), "--out", str(gt)])
    dets = write_dets(tmp_path / "dets.json", [{**d, "bbox": [v + 1.5 for v in d["bbox"]]} for d in PERFECT])
    run(eval_det, ["--gt", str(gt), "--dets", str(dets), "--metric", "coco", "--out", str(tmp_path / "e")])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt))
        direct = COCOeval(coco, coco.loadRes(str(dets)), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    stats = json.loads((tmp_path / "e" / "metrics.json").read_text())["stats"]
    assert [stats[k] for k in ("AP", "AP50", "AP75")] == direct.stats[:3].tolist()


@pytest.mark.parametrize(
    ("dets", "message"),
    [
        (None, "dets.json: file not found"),
        ("{oops", "dets.json: malformed JSON"),
        ({"image_id": 1}, "dets.json: detections must be a COCO results list"),
        (
            [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
            "dets.json: malformed COCO results entry",
        ),
        ([{**PERFECT[0], "category_id": 5}], r"dets.json: unknown category id\(s\) \[5\]"),
        ([{**PERFECT[0], "image_id": 42}], "dets.json: image id 42 is not in the ground truth"),
        ([{**PERFECT[0], "score": float("nan")}], "dets.json: box coordinates and scores must be finite"),
    ],
)
def test_eval_det_errors_are_one_line_exit_2(
    folder: Path, tmp_path: Path, capsys, dets, message: str
) -> None:
    path = tmp_path / "dets.json"
    if dets is not None:
        path.write_text(dets if isinstance(dets, str) else json.dumps(dets))
    assert run(eval_det, ["--gt", str(folder), "--dets", str(path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the data set's load report is logged first
    assert (
        "Traceback" not in "\n".join(err) and [line for line in err if line.startswith("error: ")] == err[-1:]
    )
    assert re.search(message, err[-1])


def test_cli_from_repo_root(folder: Path, tmp_path: Path) -> None:
    (folder / "p3.xml").write_text("<annotation>")  # malformed
    command = [sys.executable, "tools/convert_dataset.py", str(folder), "--out", str(tmp_path / "x.json")]
    failed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: {folder / 'p3.xml'}: malformed XML")
    skipped = subprocess.run(
        [*command, "--skip-errors"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert skipped.returncode == 0 and "2 images" in skipped.stdout
    assert "files skipped on error: 1 (" in skipped.stderr and "p3.xml: malformed XML" in skipped.stderr
