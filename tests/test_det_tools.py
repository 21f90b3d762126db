"""tools/convert_dataset.py and tools/eval_det.py: outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import contextlib
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
from tool_loader import load_tool

from backbone.runtime import run_tool
from detect.datasets import read_coco

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


# Scoring on a machine without the images: sizes come from the annotations.
SIZED_OBJECTS = {
    "p1": [("pear", 1, 1, 30, 30)],
    "p2": [("plum", 5, 5, 40, 20), ("pear", 20, 20, 70, 45)],  # the pear runs off the image: clipped
    "p3": [],
}
MIXED = [
    *PERFECT,
    *({**d, "bbox": [v + 1.5 for v in d["bbox"]], "score": d["score"] / 2} for d in PERFECT),
    {"image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.95},  # top-ranked false positive
    # IoU 0.53 with the pear clipped to the 64 px width, 0.47 unclipped: a hit only if the size is known.
    {"image_id": 2, "category_id": 1, "bbox": [19, 19, 24, 26], "score": 0.99},
]


def sized_xml(stem: str) -> str:
    body = "".join(XML[1].format(*obj) for obj in SIZED_OBJECTS[stem])
    size = "<size><width>64</width><height>48</height></size>"
    return f"<annotation><filename>{stem}.jpg</filename>{size}{body}</annotation>"


def make_voc(root: Path) -> Path:
    """A VOC devkit year directory whose XML records the true sizes (64x48)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for stem in SIZED_OBJECTS:
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(sized_xml(stem))
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(SIZED_OBJECTS) + "\n")
    return root


def make_flat(root: Path) -> Path:
    root.mkdir(parents=True)
    for stem in SIZED_OBJECTS:
        Image.new("RGB", (64, 48)).save(root / f"{stem}.jpg")
        (root / f"{stem}.xml").write_text(sized_xml(stem))
    return root


def evaluate(gt: Path, metric: str, out: Path, extra: list[str], capsys) -> tuple[dict, str]:
    dets = write_dets(out.parent / "dets.json", MIXED)
    argv = ["--gt", str(gt), "--dets", str(dets), "--metric", metric, "--out", str(out), "--no-plots"]
    assert run(eval_det, argv + extra) == 0
    logged = capsys.readouterr().err
    return json.loads((out / "metrics.json").read_text()), logged


def scores(metrics: dict) -> dict:
    per_class = {name: entry["AP"] for name, entry in metrics["per_class"].items()}
    return {"mAP": metrics["mAP"], "per_class": per_class, "stats": metrics.get("stats")}


@pytest.mark.parametrize("layout", ["voc", "folder", "coco"])
@pytest.mark.parametrize("metric", ["voc", "coco"])
def test_eval_det_without_image_files_gives_the_same_ap(
    tmp_path: Path, capsys, layout: str, metric: str
) -> None:
    extra: list[str] = []
    if layout == "voc":
        gt = make_voc(tmp_path / "VOC")
        images = sorted((gt / "JPEGImages").glob("*.jpg"))
        extra = ["--image-set", "test", "--classes", "pear,plum"]
    else:
        flat = make_flat(tmp_path / "flat")
        images = sorted(flat.glob("*.jpg"))
        gt = flat
        if layout == "coco":  # sizes recorded from the images by the converter
            gt = tmp_path / "gt.json"
            run(convert_dataset, [str(flat), "--out", str(gt)])
    with_images, logged = evaluate(gt, metric, tmp_path / "with", extra, capsys)
    assert "size taken from the annotation" not in logged
    for image in images:
        image.unlink()
    without, logged = evaluate(gt, metric, tmp_path / "without", extra, capsys)
    assert f"image files absent: size taken from the annotation: {len(images)}" in logged
    assert scores(without) == scores(with_images)
    assert 0 < without["mAP"] < 1  # false positives ranked first: a score that could differ
    if layout != "coco":  # the clipped pear: clipped by the annotated size, as by the real one
        assert "boxes clipped to the image: 1" in logged


def test_eval_det_without_images_and_without_sizes_is_one_line_error(
    folder: Path, tmp_path: Path, capsys
) -> None:
    # The fixture's XML says 0x0: with the images gone nothing tells the size the boxes are clipped to.
    for image in folder.glob("*.jpg"):
        image.unlink()
    dets = write_dets(tmp_path / "dets.json", PERFECT)
    assert run(eval_det, ["--gt", str(folder), "--dets", str(dets), "--out", str(tmp_path / "e")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"error: {folder / 'p1.jpg'}: image file not found, and its annotation has size 0x0 to use instead"
    )
