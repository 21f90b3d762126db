"""DetectionEvaluator: reset/process/evaluate in one process and across two gloo ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detect.datasets.records import DetectionDataset, DetectionRecord
from detect.evaluation import DetectionEvaluator, evaluate_pascal, ground_truth_arrays
from detect.evaluation.arrays import concat_detections, detections_from_predictions


def make_dataset(images: int = 12, seed: int = 0) -> DetectionDataset:
    rng = np.random.default_rng(seed)
    records = []
    for image_id in range(1, images + 1):
        count = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (count, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 40, (count, 2))], axis=1).astype(np.float32)
        labels = rng.integers(0, 3, count)
        difficult = rng.random(count) < 0.15
        records.append(DetectionRecord(image_id, f"/data/{image_id}.jpg", 100, 100, boxes, labels, difficult))
    return DetectionDataset(records, ["a", "b", "c"], [1, 2, 3], "toy")


def make_predictions(dataset: DetectionDataset, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    predictions = []
    for record in dataset.records:
        src = rng.integers(0, max(len(record.boxes), 1), 5)
        boxes = (
            record.boxes[src] if len(record.boxes) else np.tile([10, 10, 30, 30], (5, 1)).astype(np.float32)
        )
        boxes = boxes + rng.normal(0, 3, boxes.shape).astype(np.float32)
        labels = record.labels[src] if len(record.labels) else rng.integers(0, 3, 5)
        predictions.append(
            {
                "image_id": record.image_id,
                "boxes": torch.from_numpy(boxes),
                "scores": torch.from_numpy(rng.random(5).astype(np.float32)),
                "labels": torch.from_numpy(np.asarray(labels, np.int64)),
            }
        )
    return predictions


def same_aps(first: list[float], second: list[float]) -> bool:
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(first, second, strict=True))


@pytest.mark.parametrize("metric", ["voc07", "voc", "ilsvrc"])
def test_single_process_equals_functional(metric: str) -> None:
    dataset = make_dataset()
    predictions = make_predictions(dataset)
    evaluator = DetectionEvaluator(dataset, metric)
    evaluator.process(predictions[:5])
    evaluator.process(predictions[5:])
    result = evaluator.evaluate()
    dets, _ = detections_from_predictions(predictions, 3)
    expected = evaluate_pascal(ground_truth_arrays(dataset), dets, metric)
    assert same_aps(result.ap, expected.ap)
    assert 0.0 < result.mean_ap < 1.0
    evaluator.reset()
    evaluator.process(predictions[:1])
    assert evaluator.evaluate().num_detections != result.num_detections  # reset forgot the rest


def test_subset_and_repeated_images() -> None:
    dataset = make_dataset()
    predictions = make_predictions(dataset)
    evaluator = DetectionEvaluator(dataset, "voc")
    evaluator.process(predictions[:4] + predictions[:2])  # images 1, 2 repeated (sampler padding)
    result = evaluator.evaluate()
    dets, _ = detections_from_predictions(predictions[:4], 3)
    subset = ground_truth_arrays(dataset, [1, 2, 3, 4])
    expected = evaluate_pascal(subset, dets, "voc")
    assert same_aps(result.ap, expected.ap) and result.num_positives == expected.num_positives
    assert result.num_positives != evaluate_pascal(ground_truth_arrays(dataset), dets, "voc").num_positives
    assert sum(result.num_detections) == 20


def test_bad_predictions_are_rejected() -> None:
    evaluator = DetectionEvaluator(make_dataset(), "voc")
    with pytest.raises(ValueError, match="image id 99"):
        evaluator.process([{"image_id": 99, "boxes": np.zeros((0, 4)), "scores": [], "labels": []}])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        evaluator.process([{"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [3]}])
    with pytest.raises(ValueError, match="finite"):
        evaluator.process(
            [{"image_id": 1, "boxes": [[0, 0, float("nan"), 1]], "scores": [0.5], "labels": [0]}]
        )
    with pytest.raises(ValueError, match="metric must be one of"):
        DetectionEvaluator(make_dataset(), "map")


DIST_METRICS = ("ilsvrc", "coco")


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dataset = make_dataset()
        predictions = make_predictions(dataset)
        padded = predictions + predictions[1:2]  # 13 samples over 2 ranks: image 2 on both ranks
        results = {}
        for metric in DIST_METRICS:
            evaluator = DetectionEvaluator(dataset, metric)
            evaluator.process(padded[rank::world])
            result = evaluator.evaluate()
            assert (result is None) == (rank != 0)
            results[metric] = result.to_json_dict() if result is not None else None
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "rank0.json"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    gathered = json.loads(out.read_text())
    dataset = make_dataset()
    for metric in DIST_METRICS:
        evaluator = DetectionEvaluator(dataset, metric)
        evaluator.process(make_predictions(dataset))
        assert gathered[metric] == json.loads(json.dumps(evaluator.evaluate().to_json_dict()))


def test_concat_of_nothing_is_empty() -> None:
    assert len(concat_detections([])) == 0
