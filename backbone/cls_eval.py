"""Multi-crop, multi-model classification evaluation (the paper's section 7 test protocol).

``predict_multi_crop`` runs one model over a loader of ``(crops (B, N, S, S, 3) uint8, labels)``
batches (``backbone.transforms.MultiCropTransform``) and returns the softmax averaged over each
image's N crops. ``predict_ensemble`` runs several checkpoints over one data set (each at its own
crop size, BatchNorm folded) and averages these per-model probabilities (``tools/eval_cls.py``).
``classification_report`` turns probabilities into top-1/top-5 error, per-class accuracy and a
confusion matrix; ``save_confusion_png`` draws the latter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from backbone.inference import fuse_for_inference
from backbone.runtime.files import atomic_write
from backbone.runtime.loader import limit_worker_threads
from backbone.transforms import MultiCropTransform, normalize_crops

logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict_multi_crop(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_crops_per_forward: int = 64,
    progress=None,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (M, C) float64, labels (M,) int64)``: softmax averaged over each image's crops.

    Crops go through the model in chunks of at most ``max_crops_per_forward`` (bounded memory for
    144 crops; on a 2-core CPU 64 crops of 128 px ran 1.2x as fast as 256), normalised and in
    channels_last layout, under bfloat16 autocast when ``bf16`` (2x faster on an AVX512-BF16 CPU).
    ``model`` must return logits or an object with a ``logits`` attribute (``GoogLeNetOutputs``);
    it is put in eval mode.
    """
    model.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    all_probs, all_labels = [], []
    for crops, labels in batches:
        if crops.ndim == 4:  # a single crop per image: (B, S, S, 3)
            crops = crops.unsqueeze(1)
        num_images, num_crops = crops.shape[:2]
        flat = crops.reshape(num_images * num_crops, *crops.shape[2:])
        chunks = []
        for start in range(0, flat.shape[0], max_crops_per_forward):
            with autocast:
                out = model(normalize_crops(flat[start : start + max_crops_per_forward]))
            logits = out.logits if hasattr(out, "logits") else out
            chunks.append(torch.softmax(logits.float(), dim=1))
        probs = torch.cat(chunks).reshape(num_images, num_crops, -1).mean(dim=1)
        all_probs.append(probs.double().numpy())
        all_labels.append(np.asarray(labels, np.int64))
        if progress is not None:
            progress.update(num_images)
    return np.concatenate(all_probs), np.concatenate(all_labels)


@dataclass
class EnsembleMember:
    """One checkpoint of an ensemble: where it came from, the model and the crop size it is tested at."""

    checkpoint: str | Path
    model: nn.Module
    image_size: int


@dataclass
class EnsemblePrediction:
    """``probs`` (M, C) float64: the members' crop-averaged softmax averaged over the members;
    ``members``: per checkpoint its top-1 error and speed; ``member_probs``: each member's (M, C)
    float32 probabilities when asked for (``keep_member_probs``), else empty."""

    probs: np.ndarray
    labels: np.ndarray
    members: list[dict[str, Any]]
    member_probs: list[np.ndarray] = field(default_factory=list)


def predict_ensemble(
    members: Sequence[EnsembleMember],
    dataset: Dataset,
    class_names: Sequence[str],
    crops: int,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int | None = None,
    workers: int = 1,
    fuse: bool = True,
    bf16: bool = False,
    keep_member_probs: bool = False,
) -> EnsemblePrediction:
    """Each member over ``dataset`` (only ``indices`` when given) with ``crops`` crops per image.

    ``dataset`` must have a settable ``transform`` (``ImageClassificationDataset``, the synthetic
    set): it becomes each member's ``MultiCropTransform`` in turn. ``fuse`` folds BatchNorm into the
    convolutions first (``fuse_for_inference``); ``batch_size`` defaults to about 256 crops.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    subset = dataset if indices is None else Subset(dataset, list(indices))
    batch_size = batch_size or max(1, 256 // crops)
    total, labels, member_probs, summaries = None, None, [], []
    for member in members:
        size = member.image_size
        dataset.transform = MultiCropTransform(size, crops, train_size=size)
        model = fuse_for_inference(member.model) if fuse else member.model
        model = model.to(memory_format=torch.channels_last)
        loader = DataLoader(
            subset,
            batch_size=batch_size,
            num_workers=workers,
            shuffle=False,
            worker_init_fn=limit_worker_threads,  # OpenCV's own threads would fight the model's
        )
        tick = time.perf_counter()
        with tqdm(total=len(subset), desc=Path(member.checkpoint).name, unit="img") as bar:
            probs, labels = predict_multi_crop(model, loader, progress=bar, bf16=bf16)
        seconds = time.perf_counter() - tick
        report = classification_report(probs, labels, class_names)
        summaries.append(
            {
                "checkpoint": str(member.checkpoint),
                "image_size": size,
                "top1_error": report["top1_error"],
                "seconds": seconds,
                "images_per_second": len(subset) / seconds,
            }
        )
        logger.info(
            "%s: top-1 error %.2f%% (%.1f images/s)",
            member.checkpoint,
            report["top1_error"],
            len(subset) / seconds,
        )
        total = probs if total is None else total + probs
        if keep_member_probs:
            member_probs.append(probs.astype(np.float32))
    return EnsemblePrediction(total / len(members), labels, summaries, member_probs)


def classification_report(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Top-1 / top-5 error in percent (top-5 only for more than 5 classes: with 5 or fewer it is
    always 0), per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    num_classes = len(class_names)
    if probs.shape != (len(labels), num_classes):
        raise ValueError(
            f"probabilities of shape {probs.shape} for {len(labels)} labels and {num_classes} classes"
        )
    k = min(5, num_classes)
    # A stable sort on -p ranks ties by class index, so results do not depend on the platform.
    ranked = np.argsort(-probs, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    topk = (ranked[:, :k] == labels[:, None]).any(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, ranked[:, 0]), 1)
    support = confusion.sum(axis=1)
    per_class = {
        name: (float(confusion[c, c] / support[c] * 100.0) if support[c] else None)
        for c, name in enumerate(class_names)
    }
    top5 = {"top5_error": float(100.0 - topk.mean() * 100.0)} if num_classes > 5 else {}
    return {
        "num_images": int(len(labels)),
        "top1_error": float(100.0 - top1.mean() * 100.0),
        **top5,
        "top1_accuracy": float(top1.mean() * 100.0),
        "per_class_accuracy": per_class,
        "per_class_support": {name: int(support[c]) for c, name in enumerate(class_names)},
        "confusion_matrix": confusion.tolist(),
    }


def save_confusion_png(
    confusion: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Row-normalised confusion matrix (true class per row); counts are written in cells when few."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    num_classes = len(class_names)
    side = min(4 + 0.45 * num_classes, 40)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num_classes <= 40:
        ax.set_xticks(range(num_classes), class_names, rotation=90)
        ax.set_yticks(range(num_classes), class_names)
    if num_classes <= 20:
        for (row, col), count in np.ndenumerate(confusion.astype(np.int64)):
            colour = "white" if rates[row, col] > 0.5 else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(fig)
