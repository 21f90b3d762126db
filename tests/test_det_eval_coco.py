"""``coco`` equals a direct pycocotools run, through every entry point."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detect.datasets import read_coco
from detect.datasets.coco import load_json
from detect.evaluation import DetectionEvaluator, evaluate_coco


def make_coco_case(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """GT with non-contiguous category ids, small/medium/large boxes, a crowd box; jittered dets."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, 13):
        width, height = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        name = f"im{image_id}.png"
        Image.new("RGB", (width, height)).save(tmp_path / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for _ in range(int(rng.integers(0, 5))):
            side = float(rng.choice([12.0, 50.0, 150.0]))
            x, y = float(rng.uniform(0, width - side)), float(rng.uniform(0, height - side))
            category = int(rng.choice([3, 7, 11]))
            crowd = int(rng.random() < 0.08)
            annotations.append(
                {
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                    "bbox": [x, y, side, side], "area": side * side, "iscrowd": crowd,
                }
            )  # fmt: skip
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, side * 0.1, 4)
                box = [x + jitter[0], y + jitter[1], side + jitter[2], side + jitter[3]]
                results.append(
                    {"image_id": image_id, "category_id": category, "bbox": box, "score": rng.random()}
                )
        for _ in range(3):  # background false positives
            box = [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), 40.0, 30.0]
            category = int(rng.choice([3, 7, 11]))
            results.append(
                {"image_id": image_id, "category_id": category, "bbox": box, "score": rng.random()}
            )
    categories = [{"id": 11, "name": "kiwi"}, {"id": 3, "name": "fig"}, {"id": 7, "name": "lime"}]
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    dets_path = tmp_path / "dets.json"
    dets_path.write_text(json.dumps(results))
    return gt_path, dets_path


def direct_pycocotools(gt_path: Path, dets_path: Path) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(dets_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_evaluate_coco_equals_direct_pycocotools(tmp_path: Path) -> None:
    gt_path, dets_path = make_coco_case(tmp_path)
    direct = direct_pycocotools(gt_path, dets_path)
    ours = evaluate_coco(load_json(gt_path), load_json(dets_path), ["fig", "lime", "kiwi"], [3, 7, 11])
    assert [ours.stats[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == direct.stats[:6].tolist()
    assert [ours.stats[k] for k in ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")] == direct.stats[6:].tolist()
    assert ours.mean_ap == direct.stats[0]
    assert 0.05 < ours.mean_ap < 0.95  # a non-trivial case
    for k, cat in enumerate(direct.params.catIds):  # per-class AP straight from the precision array
        slice_ = direct.eval["precision"][:, :, k, 0, -1]
        assert ours.ap[[3, 7, 11].index(cat)] == pytest.approx(float(slice_[slice_ > -1].mean()), abs=0)
    assert "Average Precision" in ours.summary_text


def test_evaluator_on_loaded_records_equals_direct_run(tmp_path: Path) -> None:
    gt_path, dets_path = make_coco_case(tmp_path, seed=1)
    direct = direct_pycocotools(gt_path, dets_path)
    dataset, _ = read_coco(gt_path)
    results = load_json(dets_path)
    label_of = {c: i for i, c in enumerate(dataset.category_ids)}
    for coco_gt in (None, load_json(gt_path)):  # from the records, and from the original file
        evaluator = DetectionEvaluator(dataset, "coco", coco_gt=coco_gt)
        for record in dataset.records:
            mine = [r for r in results if r["image_id"] == record.image_id]
            xywh = np.asarray([r["bbox"] for r in mine], np.float64).reshape(-1, 4)
            evaluator.process(
                [
                    {
                        "image_id": record.image_id,
                        "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                        "scores": [r["score"] for r in mine],
                        "labels": [label_of[r["category_id"]] for r in mine],
                    }
                ]
            )
        result = evaluator.evaluate()
        # xywh -> xyxy -> xywh may move a coordinate by one ulp: equal to far below printed digits.
        np.testing.assert_allclose(list(result.stats.values())[:12], direct.stats, rtol=0, atol=1e-12)


def test_coco_without_detections(tmp_path: Path) -> None:
    gt_path, _ = make_coco_case(tmp_path)
    result = evaluate_coco(load_json(gt_path), [], ["fig", "lime", "kiwi"], [3, 7, 11])
    assert result.mean_ap == 0.0 and result.ap == [0.0, 0.0, 0.0]
