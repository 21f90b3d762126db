"""voc07 / voc / ilsvrc on hand-worked cases, the +1 convention, and the vectorised-vs-loop identity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.datasets import parse_voc_xml
from detect.datasets.voc import record_from_xml
from detect.evaluation import DetectionArrays, GroundTruthArrays, evaluate_pascal, match_detections
from detect.evaluation.ap import VOC07_RECALL_POINTS, average_precision_11_point, average_precision_all_point
from detect.evaluation.matching import ilsvrc_thresholds, pair_iou, qualifying_pairs
from detect.evaluation.reference import reference_pascal_ap


def gt_arrays(objects: list[tuple], images: list[int], classes: int = 1) -> GroundTruthArrays:
    """objects: (image_id, label, x1, y1, x2, y2[, difficult])."""
    return GroundTruthArrays(
        image_ids=np.asarray(sorted(images), np.int64),
        box_image_ids=np.asarray([o[0] for o in objects], np.int64),
        boxes=np.asarray([o[2:6] for o in objects], np.float64).reshape(-1, 4),
        labels=np.asarray([o[1] for o in objects], np.int64),
        difficult=np.asarray([bool(o[6]) if len(o) > 6 else False for o in objects], bool),
        class_names=[f"class{c}" for c in range(classes)],
    )


def det_arrays(dets: list[tuple]) -> DetectionArrays:
    """dets: (image_id, label, score, x1, y1, x2, y2)."""
    return DetectionArrays(
        image_ids=np.asarray([d[0] for d in dets], np.int64),
        boxes=np.asarray([d[3:7] for d in dets], np.float64).reshape(-1, 4),
        scores=np.asarray([d[2] for d in dets], np.float64),
        labels=np.asarray([d[1] for d in dets], np.int64),
    )


# Two objects in image 1, one in image 2; a duplicate and a miss. Ranked: TP, FP (duplicate), TP, FP.
HAND_GT = [(1, 0, 0, 0, 10, 10), (1, 0, 50, 50, 70, 70), (2, 0, 0, 0, 20, 20)]
HAND_DETS = [
    (1, 0, 0.9, 0, 0, 10, 10),
    (1, 0, 0.8, 1, 0, 10, 10),  # IoU 0.9 with the taken object: duplicate
    (2, 0, 0.7, 0, 0, 20, 19),
    (2, 0, 0.6, 30, 30, 40, 40),
]


def test_hand_worked_voc_all_point_and_11_point() -> None:
    gt, dets = gt_arrays(HAND_GT, [1, 2]), det_arrays(HAND_DETS)
    # recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2.
    # all-point: 1/3 * 1 + 1/3 * 2/3 = 5/9.  11-point: t <= 0.3 -> 1 (4 points), 0.4..0.6 -> 2/3 (3 points).
    assert evaluate_pascal(gt, dets, "voc").ap[0] == pytest.approx(5 / 9, abs=1e-15)
    assert evaluate_pascal(gt, dets, "voc07").ap[0] == pytest.approx((4 + 3 * 2 / 3) / 11, abs=1e-15)
    _, status = match_detections(gt, dets, "voc")
    assert status.tolist() == [1, 0, 1, 0]


def test_difficult_objects_are_neither_positive_nor_false_positive() -> None:
    objects = [*HAND_GT, (2, 0, 100, 100, 140, 140, 1)]
    dets = [(2, 0, 0.95, 100, 100, 140, 140), (2, 0, 0.94, 101, 100, 140, 140), *HAND_DETS]
    for metric in ("voc", "ilsvrc"):
        result = evaluate_pascal(gt_arrays(objects, [1, 2]), det_arrays(dets), metric)
        assert result.num_positives == [3]
        assert result.ap[0] == pytest.approx(5 / 9, abs=1e-15)  # unchanged: both matches ignored
        _, status = match_detections(gt_arrays(objects, [1, 2]), det_arrays(dets), metric)
        assert status.tolist()[:2] == [-1, -1]


def test_empty_classes() -> None:
    gt = gt_arrays([(1, 0, 0, 0, 10, 10), (1, 2, 0, 0, 10, 10, 1)], [1, 2], classes=4)
    dets = det_arrays([(1, 0, 0.5, 0, 0, 10, 10), (2, 1, 0.9, 0, 0, 5, 5)])
    result = evaluate_pascal(gt, dets, "voc")
    # class 0 perfect; 1 has detections but no objects; 2 only a difficult one; 3 nothing at all.
    assert result.ap[0] == 1.0 and all(math.isnan(a) for a in result.ap[1:])
    assert result.mean_ap == 1.0 and result.num_detections == [1, 1, 0, 0]
    assert "n/a" in result.table()
    assert result.to_json_dict()["per_class"]["class1"]["AP"] is None
    no_dets = evaluate_pascal(gt, det_arrays([]), "voc07")
    assert no_dets.ap[0] == 0.0 and no_dets.mean_ap == 0.0


def test_iou_exactly_half_is_a_true_positive() -> None:
    # py-faster-rcnn's voc_eval.py requires IoU > 0.5 and would call this a false positive.
    gt = gt_arrays([(1, 0, 0, 0, 10, 10)], [1])
    dets = det_arrays([(1, 0, 0.9, 0, 0, 10, 5)])
    assert pair_iou(dets.boxes, gt.boxes)[0] == 0.5
    assert evaluate_pascal(gt, dets, "voc").ap[0] == 1.0


def test_11_point_uses_matlab_colon_sample_points() -> None:
    assert VOC07_RECALL_POINTS[3] == 0.30000000000000004 and VOC07_RECALL_POINTS[6] == 0.6
    assert float(np.arange(0.0, 1.1, 0.1)[6]) == 0.6000000000000001  # py-faster-rcnn / detectron2
    perfect = np.ones(3)
    # 3 of 5 found, all correct: recall reaches exactly 0.6, so t = 0, 0.1, ..., 0.6 count: 7/11.
    assert average_precision_11_point(np.array([0.2, 0.4, 0.6]), perfect) == pytest.approx(7 / 11, abs=1e-15)
    # 3 of 10: recall 0.3 < MATLAB's 0.30000000000000004, so only t = 0, 0.1, 0.2 count: 3/11.
    assert average_precision_11_point(np.array([0.1, 0.2, 0.3]), perfect) == pytest.approx(3 / 11, abs=1e-15)
    assert average_precision_all_point(np.array([0.2, 0.4, 0.6]), perfect) == pytest.approx(0.6, abs=1e-15)


def test_ilsvrc_threshold_for_small_boxes() -> None:
    small = gt_arrays([(1, 0, 0, 0, 10, 10)], [1])  # 10x10: threshold 100 / (20 * 20) = 0.25
    big = gt_arrays([(1, 0, 0, 0, 100, 100)], [1])  # min(0.5, 10000 / 12100) = 0.5
    assert ilsvrc_thresholds(small.boxes).tolist() == [0.25]
    assert ilsvrc_thresholds(big.boxes).tolist() == [0.5]
    shifted = det_arrays([(1, 0, 0.9, 0, 0, 10, 3)])  # IoU 0.3
    assert pair_iou(shifted.boxes, small.boxes)[0] == pytest.approx(0.3)
    assert evaluate_pascal(small, shifted, "ilsvrc").ap[0] == 1.0
    assert evaluate_pascal(small, shifted, "voc").ap[0] == 0.0
    at_threshold = det_arrays([(1, 0, 0.9, 0, 0, 10, 2.5)])  # IoU exactly 0.25: passes (>=)
    assert evaluate_pascal(small, at_threshold, "ilsvrc").ap[0] == 1.0
    big_det = det_arrays([(1, 0, 0.9, 0, 0, 100, 30)])  # IoU 0.3 with a big box: not enough
    assert evaluate_pascal(big, big_det, "ilsvrc").ap[0] == 0.0


def test_ilsvrc_greedy_takes_next_untaken_object_where_voc_says_duplicate() -> None:
    # Two overlapping objects; both detections overlap A best, the second also passes for B.
    gt = gt_arrays([(1, 0, 0, 0, 100, 100), (1, 0, 20, 0, 120, 100)], [1])
    dets = det_arrays([(1, 0, 0.9, 0, 0, 100, 100), (1, 0, 0.8, 5, 0, 105, 100)])
    _, voc_status = match_detections(gt, dets, "voc")
    _, ilsvrc_status = match_detections(gt, dets, "ilsvrc")
    assert voc_status.tolist() == [1, 0]  # best match taken -> false positive
    assert ilsvrc_status.tolist() == [1, 1]  # goes on to the untaken B (IoU 0.74)
    assert evaluate_pascal(gt, dets, "voc").ap[0] == 0.5
    assert evaluate_pascal(gt, dets, "ilsvrc").ap[0] == 1.0


def test_ilsvrc_prefers_highest_iou_among_untaken() -> None:
    gt = gt_arrays([(1, 0, 0, 0, 100, 100), (1, 0, 10, 0, 110, 100), (1, 0, 40, 0, 140, 100)], [1])
    # d0 takes object 0; d1 overlaps object 0 most (taken), then 1 (IoU .82) over 2 (IoU .54).
    dets = det_arrays(
        [(1, 0, 0.9, 0, 0, 100, 100), (1, 0, 0.8, 2, 0, 102, 100), (1, 0, 0.7, 30, 0, 130, 100)]
    )
    ranked, status = match_detections(gt, dets, "ilsvrc")
    assert status.tolist() == [1, 1, 1]
    # Without object 2, d2's candidates (0: IoU .54, 1: IoU .67) are both taken: a false positive.
    gt2 = gt_arrays([(1, 0, 0, 0, 100, 100), (1, 0, 10, 0, 110, 100)], [1])
    assert match_detections(gt2, dets, "ilsvrc")[1].tolist() == [1, 1, 0]


def test_plus_one_convention_matches_literal_devkit_iou() -> None:
    """Devkit: 1-based inclusive integer boxes, iw = min(xmax) - max(xmin) + 1, areas with +1.
    Ours: x1 = xmin - 1, x2 = xmax and no +1 anywhere. The two must agree exactly."""
    rng = np.random.default_rng(0)
    xymin = rng.integers(1, 25, (5000, 2))
    a = np.concatenate([xymin, xymin + rng.integers(0, 40, (5000, 2))], axis=1).astype(np.float64)
    xymin = rng.integers(1, 25, (5000, 2))
    b = np.concatenate([xymin, xymin + rng.integers(0, 40, (5000, 2))], axis=1).astype(np.float64)
    devkit = []
    for bb, bbgt in zip(a.tolist(), b.tolist(), strict=True):
        iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
        ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
        ov = 0.0
        if iw > 0 and ih > 0:
            ua = (
                (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                - iw * ih
            )
            ov = iw * ih / ua
        devkit.append(ov)
    to_ours = np.array([1.0, 1.0, 0.0, 0.0])
    ours = pair_iou(a - to_ours, b - to_ours)
    assert (ours == np.asarray(devkit)).all()  # bit for bit
    assert (np.asarray(devkit) > 0).mean() > 0.5  # and the sample really overlaps
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    assert (ilsvrc_thresholds(b - to_ours) == np.minimum(0.5, w * h / ((w + 10) * (h + 10)))).all()


def test_xml_reader_carries_the_plus_one(tmp_path: Path) -> None:
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>c</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>"
                   "<ymax>1</ymax></bndbox></object></annotation>")  # fmt: skip
    assert parse_voc_xml(xml).boxes.tolist() == [[1, 1, 10, 1]]  # devkit: 10 wide, 1 high
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    record, _ = record_from_xml(parse_voc_xml(xml), tmp_path / "a.png", 1, {"c": 0})
    assert record.boxes.tolist() == [[0, 0, 10, 1]]


def random_case(seed: int, images: int = 40, classes: int = 4, dets: int = 1500):
    rng = np.random.default_rng(seed)
    count = images * 3
    image_of = rng.integers(0, images, count)
    labels = rng.integers(0, classes, count)
    xy = rng.integers(0, 60, (count, 2))
    boxes = np.concatenate([xy, xy + rng.integers(1, 40, (count, 2))], axis=1).astype(np.float64)
    gt = GroundTruthArrays(
        np.arange(images, dtype=np.int64), image_of, boxes, labels, rng.random(count) < 0.1,
        [f"c{k}" for k in range(classes)],
    )  # fmt: skip
    source = rng.integers(0, count, dets)
    det_boxes = boxes[source] + rng.integers(-5, 6, (dets, 4))
    det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
    det_labels = np.where(rng.random(dets) < 0.8, labels[source], rng.integers(0, classes, dets))
    scores = np.round(rng.random(dets), 2)  # many ties
    return gt, DetectionArrays(image_of[source], det_boxes, scores, det_labels)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ["voc07", "voc", "ilsvrc"])
def test_vectorised_equals_straightforward_loops(seed: int, metric: str) -> None:
    gt, dets = random_case(seed)
    fast = evaluate_pascal(gt, dets, metric).ap
    slow = reference_pascal_ap(gt, dets, metric)
    assert fast == slow or all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(fast, slow, strict=True)
    )


def test_chunked_pair_building_is_exact() -> None:
    gt, dets = random_case(1)
    keys_gt = gt.labels * 1000 + gt.box_image_ids
    order = np.argsort(keys_gt, kind="stable")
    keys_det = dets.labels * 1000 + dets.image_ids
    start = np.searchsorted(keys_gt[order], keys_det, side="left")
    count = np.searchsorted(keys_gt[order], keys_det, side="right") - start
    args = (start, count, dets.boxes, gt.boxes[order], np.full(len(order), 0.3))
    whole = qualifying_pairs(*args)
    tiny = qualifying_pairs(*args, chunk=7)
    assert len(whole[0]) > 100
    for x, y in zip(whole, tiny, strict=True):
        np.testing.assert_array_equal(x, y)


def test_ranking_breaks_score_ties_by_image_then_input_order() -> None:
    gt = gt_arrays([(1, 0, 0, 0, 10, 10), (2, 0, 0, 0, 10, 10)], [1, 2])
    dets = det_arrays([(2, 0, 0.5, 0, 0, 10, 10), (1, 0, 0.5, 50, 50, 60, 60), (1, 0, 0.5, 0, 0, 10, 10)])
    ranked, status = match_detections(gt, dets, "voc")
    assert ranked.image_ids.tolist() == [1, 1, 2]
    assert status.tolist() == [0, 1, 1]


def test_detections_on_unknown_images_are_rejected() -> None:
    with pytest.raises(ValueError, match="image id 9"):
        evaluate_pascal(gt_arrays(HAND_GT, [1, 2]), det_arrays([(9, 0, 0.5, 0, 0, 1, 1)]), "voc")
    with pytest.raises(ValueError, match="metric must be"):
        evaluate_pascal(gt_arrays(HAND_GT, [1, 2]), det_arrays([]), "voc2012")
