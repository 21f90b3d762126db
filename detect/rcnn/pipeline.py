"""The detector's data-set-level steps shared by train_det and test_det: open a split (or make the
synthetic one), get its cached proposals, score it, and write results as the tools report them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backbone.runtime.dist import is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write_text
from detect.datasets.records import DetectionDataset
from detect.datasets.spec import DatasetSpec, open_dataset_specs
from detect.datasets.synthetic import build_synthetic_detection_dataset
from detect.evaluation import DetectionArrays, DetectionEvalResult, detections_to_coco_results
from detect.proposals.shards import ProposalColumn
from detect.proposals.spec import ProposalSpec, ensure_proposals
from detect.rcnn.data import RegionScoringDataset
from detect.rcnn.engine import (
    InferenceSettings,
    count_skipped,
    evaluate_predictions,
    gather_predictions,
    inference_on_dataset,
)
from detect.rcnn.model import RegionClassifier
from detect.visualize import save_pr_curves

logger = logging.getLogger(__name__)


@dataclass
class DetectionSplit:
    dataset: DetectionDataset
    split: str  # the proposal cache's split directory


def load_split(
    specs: Sequence[DatasetSpec],
    split: str,
    *,
    synthetic_root: str | Path = "runs/data/synthetic_det",
    synthetic_images: int = 48,
    synthetic_image_size: int = 160,
    seed: int = 0,
    on_bad_image: str = "skip",
) -> DetectionSplit:
    """The entries ``specs`` as one split; none: the built-in synthetic scenes of ``split``. Bad
    image files are skipped (named in the log) or, under ``on_bad_image="error"``, an error."""
    if not specs:
        dataset = build_synthetic_detection_dataset(
            synthetic_root, split, num_images=synthetic_images, image_size=synthetic_image_size, seed=seed
        )
        logger.info("%s: %d synthetic scenes under %s", split, len(dataset.records), synthetic_root)
        return DetectionSplit(dataset, split)
    try:
        dataset, lines = open_dataset_specs(tuple(specs), name=split, on_bad_image=on_bad_image)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    for line in lines:
        logger.info("%s: %s", split, line)
    return DetectionSplit(dataset, split)


def split_proposals(
    split: DetectionSplit, spec: ProposalSpec, name: str, progress: bool = True, on_bad_image: str = "skip"
) -> tuple[ProposalColumn, dict]:
    """The split's proposal boxes per record (building a missing cache), read from the cache per
    image when indexed, and the method's settings; the images the cache skipped are named in the log
    (an error under ``on_bad_image="error"``)."""
    records = split.dataset.records
    proposals, method = ensure_proposals(
        records, spec, name, split.split, progress=progress, on_bad_image=on_bad_image
    )
    counts = proposals.counts
    logger.info(
        "%s proposals: %.1f per image (%d images without any)",
        split.split,
        float(counts.mean()) if len(counts) else 0.0,
        int((counts == 0).sum()),
    )
    return proposals.boxes, method


def evaluate_detector(
    models: Sequence[RegionClassifier],
    split: DetectionSplit,
    dataset: RegionScoringDataset,
    settings: InferenceSettings,
    metrics: Sequence[str],
    *,
    workers: int = 0,
    progress: bool = True,
) -> tuple[dict[str, list[dict]], dict[str, dict[str, DetectionEvalResult]]]:
    """Detect on every image (this rank's share) in one scoring pass, score each of
    ``settings.variants`` with each metric; returns all ranks' predictions and the results per
    variant (both on rank 0; other ranks get empty ones)."""
    predictions, skipped = inference_on_dataset(models, dataset, settings, workers=workers, progress=progress)
    total_skipped = count_skipped(skipped)
    if total_skipped:
        names = [split.dataset.records[i].file_name for i in skipped]  # this rank's
        shown = ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")
        logger.warning(
            "%s: %d images skipped (their objects count as missed): %s", split.split, total_skipped, shown
        )
    results, gathered = {}, {}
    for name, variant_predictions in predictions.items():
        results[name] = evaluate_predictions(split.dataset, variant_predictions, metrics)
        everyone = gather_predictions(variant_predictions)  # a collective: every rank calls it
        gathered[name] = everyone if is_main_process() else []
    return gathered, results


def coco_results(predictions: Sequence[dict], category_ids: list[int]) -> list[dict]:
    parts = [
        DetectionArrays(
            np.full(len(p["scores"]), int(p["image_id"]), np.int64),
            np.asarray(p["boxes"], np.float64).reshape(-1, 4),
            np.asarray(p["scores"], np.float64),
            np.asarray(p["labels"], np.int64),
        )
        for p in predictions
    ]
    return [r for part in parts for r in detections_to_coco_results(part, category_ids)]


def write_evaluation(
    out_dir: str | Path,
    tag: str,
    split: DetectionSplit,
    predictions: Sequence[dict],
    results: dict[str, DetectionEvalResult],
    plots: bool = True,
) -> str:
    """Write ``detections_<tag>.json`` (COCO results), ``eval_<tag>.json`` / ``.txt``, PR curves."""
    if not is_main_process():
        return ""
    out_dir = Path(out_dir)
    dets = coco_results(predictions, split.dataset.category_ids)
    atomic_write_text(out_dir / f"detections_{tag}.json", json.dumps(dets))
    blocks = []
    for metric, result in results.items():
        blocks.append(f"[{metric}] {split.split}: {len(split.dataset.records)} images\n{result.table()}")
        if metric == "coco" and result.summary_text:
            blocks.append(result.summary_text.rstrip())
    text = "\n\n".join(blocks)
    summary = {metric: result.to_json_dict() for metric, result in results.items()}
    atomic_write_text(out_dir / f"eval_{tag}.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / f"eval_{tag}.txt", text + "\n")
    if plots and "voc" in results:
        voc = results["voc"]
        save_pr_curves(voc.curves, voc.ap, voc.class_names, out_dir / f"pr_{tag}", title=f"voc {split.split}")
    logger.info("evaluation of %s:\n%s", split.split, text)
    return text
