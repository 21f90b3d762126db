"""The detector's two drivers: the training loss step and inference over a data set.

Inference streams each image's proposals through the network in chunks of ``region_batch`` (memory
bounded whatever the proposal count), averages the softmax of every model of an ensemble (the
paper's ensemble of ConvNets), and postprocesses per image. Under torchrun each rank scores its
share of the images; the evaluator gathers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from backbone.runtime.checkpoint import unwrap_model
from backbone.runtime.dist import all_gather_object, all_reduce_sum, get_rank
from backbone.runtime.loader import build_eval_loader
from backbone.runtime.trainer import StepOutput
from detect.datasets.records import DetectionDataset
from detect.evaluation import DetectionEvalResult, DetectionEvaluator
from detect.rcnn.data import RegionScoringDataset, ScoringSample, collate_scoring
from detect.rcnn.model import RegionClassifier
from detect.rcnn.postprocess import postprocess_detections

logger = logging.getLogger(__name__)


def rcnn_step(
    device: torch.device, aux_weight: float = 0.3, channels_last: bool = True
) -> Callable[[nn.Module, tuple[Tensor, Tensor, Tensor]], StepOutput]:
    """``compute_loss`` for ``backbone.runtime.trainer.fit``: softmax over C + 1 on the sampled
    regions, plus ``aux_weight`` times each aux head's loss (as in pretraining)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def compute(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> StepOutput:
        images, rois, labels = batch
        labels = labels.to(device, non_blocking=True)
        if len(labels) == 0:  # every image of the batch without regions: a zero step, same graph
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return StepOutput(loss=zero, batch_size=0)
        images = images.to(device, memory_format=memory_format, non_blocking=True)
        out = model(images, rois.to(device, non_blocking=True))
        loss = F.cross_entropy(out.logits, labels)
        for aux in (out.aux1, out.aux2):
            if aux is not None and aux_weight:
                loss = loss + aux_weight * F.cross_entropy(aux, labels)
        background = unwrap_model(model).num_classes
        with torch.no_grad():
            correct = out.logits.argmax(1) == labels
            fg = labels != background
            metrics = {
                "acc": float(correct.float().mean()),
                "fg_acc": float(correct[fg].float().mean()) if fg.any() else float("nan"),
                "fg_fraction": float(fg.float().mean()),
            }
        return StepOutput(loss=loss, batch_size=len(labels), metrics=metrics)

    return compute


@dataclass
class RegionScores:
    """What one scoring pass gives for ``P`` boxes: the softmax, the SVMs' scores when the model
    carries SVMs, and the per-class refined boxes when it carries a box regressor."""

    probs: Tensor  # (P, C + 1), background last
    svm: Tensor | None = None  # (P, C + 1)
    refined: Tensor | None = None  # (P, C, 4)

    def scores(self, use_svm: bool) -> Tensor:
        return self.svm if use_svm and self.svm is not None else self.probs


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def score_regions(
    model: RegionClassifier,
    image: Tensor,
    boxes: Tensor,
    region_batch: int,
    channels_last: bool = True,
    precision: str = "fp32",
    flip: bool = False,
) -> RegionScores:
    """Score every box of one image ``(1, 3, h, w)``, ``region_batch`` at a time, in one pass.

    ``precision`` (fp32, bf16, fp16) is the autocast of the network's forward; the classifier, the
    SVMs and the box regressor always run in fp32 on the pooled features. ``flip``: also score the
    mirrored image and average (test-time augmentation; training already flips, so the network has
    seen both views): twice the cost.
    """
    if flip:
        direct = score_regions(model, image, boxes, region_batch, channels_last, precision)
        width = image.shape[-1]
        mirrored = score_regions(
            model, image.flip(-1), mirror_boxes(boxes, width), region_batch, channels_last, precision
        )
        refined = None
        if direct.refined is not None and mirrored.refined is not None:
            refined = (direct.refined + mirror_boxes(mirrored.refined, width)) / 2
        return RegionScores(
            (direct.probs + mirrored.probs) / 2,
            (direct.svm + mirrored.svm) / 2 if direct.svm is not None else None,
            refined,
        )
    image = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    with _autocast(image.device, precision):
        trunk = model.trunk_features(image) if model.arch.mode == "shared" else None
    regressor, svms = model.box_regressor, model.svms
    probs, svm_scores, refined = [], [], []
    for start in range(0, len(boxes), region_batch):
        chunk = boxes[start : start + region_batch]
        rois = torch.cat([chunk.new_zeros((len(chunk), 1)), chunk], dim=1)
        with _autocast(image.device, precision):
            features = model.pooled_features(image, rois, trunk)
        features = features.float()
        probs.append(F.softmax(model.backbone.fc(features).float(), dim=1))
        if svms is not None:
            svm_scores.append(svms(features))
        if regressor is not None:
            refined.append(regressor(features, chunk.float()))
    if not probs:
        empty = torch.zeros((0, model.num_classes + 1), device=image.device)
        return RegionScores(
            empty,
            empty.clone() if svms is not None else None,
            torch.zeros((0, model.num_classes, 4)) if regressor is not None else None,
        )
    return RegionScores(
        torch.cat(probs),
        torch.cat(svm_scores) if svm_scores else None,
        torch.cat(refined) if refined else None,
    )


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes ``(..., 4)`` xyxy of an image ``width`` wide, in the horizontally mirrored image."""
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1)


def region_probs(
    model: RegionClassifier, image: Tensor, boxes: Tensor, region_batch: int, channels_last: bool = True
) -> Tensor:
    """The scores the model detects with: its SVMs' when it carries them, else the softmax."""
    return score_regions(model, image, boxes, region_batch, channels_last).scores(use_svm=True)


def ensemble_scores(
    models: Sequence[RegionClassifier],
    image: Tensor,
    boxes: Tensor,
    region_batch: int,
    channels_last: bool,
    precision: str = "fp32",
    flip: bool = False,
) -> RegionScores:
    """The mean over the members of each score (the paper's ensemble averages the softmax), of the
    SVM scores when every member carries SVMs (else the softmax is what the ensemble detects with),
    and of the refined boxes of the members that regress boxes."""
    scored = [score_regions(m, image, boxes, region_batch, channels_last, precision, flip) for m in models]

    def mean(parts: list[Tensor | None]) -> Tensor | None:
        present = [p for p in parts if p is not None]
        return torch.stack(present).mean(0) if present else None

    svms = [s.svm for s in scored]
    return RegionScores(
        mean([s.probs for s in scored]),
        mean(svms) if all(s is not None for s in svms) else None,
        mean([s.refined for s in scored]),
    )


def ensemble_probs(
    models: Sequence[RegionClassifier], image: Tensor, boxes: Tensor, region_batch: int, channels_last: bool
) -> Tensor:
    return ensemble_scores(models, image, boxes, region_batch, channels_last).scores(use_svm=True)


# Detection variants one scoring pass gives: "final" uses what the models carry (SVMs and box
# regression when fitted); the others switch each extra off or on, for comparing them on one pass.
VARIANTS = {
    "final": (True, True),
    "softmax": (False, False),
    "softmax+bbox": (False, True),
    "svm": (True, False),
}


@dataclass(frozen=True)
class InferenceSettings:
    region_batch: int = 128
    score_threshold: float = 0.01
    nms_iou: float = 0.3
    max_per_image: int = 100
    channels_last: bool = True
    precision: str = "fp32"  # autocast of the region forward: fp32, bf16 (fast on this CPU), fp16
    flip: bool = False  # average with the mirrored image's scores (twice the cost)
    variants: tuple[str, ...] = ("final",)  # keys of VARIANTS to produce from each scoring pass

    @classmethod
    def from_test_config(cls, test: Mapping[str, Any], **overrides: Any) -> InferenceSettings:
        """From a train_det config's ``test`` section (a dataclass or a checkpoint's plain dict);
        ``overrides`` that are not None win (command-line options)."""
        values = dataclasses.asdict(test) if dataclasses.is_dataclass(test) else dict(test)
        values |= {key: value for key, value in overrides.items() if value is not None}
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def detect_sample_variants(
    models: Sequence[RegionClassifier], sample: ScoringSample, image_id: int, settings: InferenceSettings
) -> dict[str, dict]:
    """One scoring sample to ``{variant: {image_id, boxes, scores, labels}}`` in original image pixels."""
    device = next(models[0].parameters()).device
    image = sample.image[None].to(device)
    boxes = sample.boxes.to(device)
    scored = ensemble_scores(
        models, image, boxes, settings.region_batch, settings.channels_last, settings.precision, settings.flip
    )
    sx, sy = sample.scale
    to_original = boxes.new_tensor([sx, sy, sx, sy])
    original = boxes / to_original
    refined = scored.refined.to(boxes.device) / to_original if scored.refined is not None else None
    height, width = round(sample.image.shape[1] / sy), round(sample.image.shape[2] / sx)
    out = {}
    for name in settings.variants:
        use_svm, use_boxes = VARIANTS[name]
        dets = postprocess_detections(
            original,
            scored.scores(use_svm),
            (height, width),
            score_threshold=settings.score_threshold,
            nms_iou=settings.nms_iou,
            max_per_image=settings.max_per_image,
            class_boxes=refined if use_boxes else None,
        )
        out[name] = {"image_id": image_id} | {k: v.cpu() for k, v in dets.items()}
    return out


def detect_sample(
    models: Sequence[RegionClassifier], sample: ScoringSample, image_id: int, settings: InferenceSettings
) -> dict:
    """One scoring sample to ``{image_id, boxes, scores, labels}`` (the "final" variant)."""
    final = dataclasses.replace(settings, variants=("final",))
    return detect_sample_variants(models, sample, image_id, final)["final"]


def inference_on_dataset(
    models: Sequence[RegionClassifier],
    dataset: RegionScoringDataset,
    settings: InferenceSettings,
    *,
    workers: int = 0,
    progress: bool = True,
) -> tuple[dict[str, list[dict]], list[int]]:
    """Detections of this rank's share of ``dataset`` per variant of ``settings.variants``; also the
    record indices that could not be decoded."""
    for model in models:
        model.eval()
    loader = build_eval_loader(dataset, 1, num_workers=workers, collate_fn=collate_scoring)
    predictions: dict[str, list[dict]] = {name: [] for name in settings.variants}
    skipped: list[int] = []
    bar = tqdm(loader, desc="detect", unit="img", disable=not progress or get_rank() != 0, dynamic_ncols=True)
    for index, (sample,) in zip(loader.sampler, bar, strict=True):
        record = dataset.records[index]
        if sample is None:
            skipped.append(index)
            continue
        for name, dets in detect_sample_variants(models, sample, record.image_id, settings).items():
            predictions[name].append(dets)
    return predictions, skipped


def evaluate_predictions(
    dataset: DetectionDataset,
    predictions: Sequence[dict],
    metrics: Sequence[str],
    coco_gt: dict | None = None,
) -> dict[str, DetectionEvalResult]:
    """Every metric over this rank's predictions (collective: the evaluators gather to rank 0,
    where the results are returned; other ranks get an empty dict)."""
    results = {}
    for metric in metrics:
        evaluator = DetectionEvaluator(dataset, metric, coco_gt=coco_gt if metric == "coco" else None)
        evaluator.process(predictions)
        result = evaluator.evaluate()
        if result is not None:
            results[metric] = result
    return results


def gather_predictions(predictions: list[dict]) -> list[dict]:
    """All ranks' predictions (in rank order) as numpy, for writing one results file."""
    plain = [{k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in p.items()} for p in predictions]
    return [p for part in all_gather_object(plain) for p in part]


def count_skipped(skipped: list[int]) -> int:
    return int(all_reduce_sum({"skipped": float(len(skipped))})["skipped"])
