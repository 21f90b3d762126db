"""Saving and loading GoogLeNet weights: our checkpoints and torchvision's ImageNet weights.

A model file is a plain dict ``{"model": state_dict, "meta": {...}}`` where ``meta`` holds what is
needed to rebuild the network (variant, class count, aux heads, transform_input) plus whatever the
caller adds (class names, image size, ...). Everything loads with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from backbone.googlenet import GoogLeNet
from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_torch_save  # noqa: F401 (re-exported: model files)

TORCHVISION_WEIGHTS_HINT = (
    "download https://download.pytorch.org/models/googlenet-1378be20.pth on a machine with internet "
    "and pass its path"
)


class WeightsError(UserError, ValueError):
    """A weights file that is missing, unreadable or does not fit the model; str() is one line."""


def model_meta(model: GoogLeNet) -> dict[str, Any]:
    return {
        "variant": model.variant,
        "num_classes": model.num_classes,
        "aux_logits": model.aux_logits,
        "transform_input": model.transform_input,
    }


def save_model(path: str | Path, model: GoogLeNet, extra_meta: dict[str, Any] | None = None) -> None:
    """Save weights and the meta needed to rebuild the model (plus ``extra_meta``, e.g. class names)."""
    meta = {**(extra_meta or {}), **model_meta(model)}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "meta": meta}, path)


def read_weights_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path}: not a readable weights file ({first_line})") from err


def infer_variant(state_dict: dict[str, torch.Tensor]) -> str:
    """Tell the variant from the tensors themselves: BatchNorm or not, 5x5 or 3x3 in branch 3."""
    if "conv1.bn.weight" not in state_dict:
        return "paper"
    kernel = state_dict["inception3a.branch3.1.conv.weight"].shape[-1]
    return "bn" if kernel == 5 else "torchvision"


def infer_num_classes(state_dict: dict[str, torch.Tensor]) -> int:
    return int(state_dict["fc.weight"].shape[0])


def check_fits(model: GoogLeNet, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line WeightsError when ``state_dict`` is of another variant or class count."""
    variant = infer_variant(state_dict)
    if variant != model.variant:
        raise WeightsError(f"{source}: holds a {variant!r} GoogLeNet, the model is {model.variant!r}")
    classes = infer_num_classes(state_dict)
    if classes != model.num_classes:
        raise WeightsError(
            f"{source}: holds {classes} classes, the model has {model.num_classes} "
            "(load with the checkpoint's class count, then call reset_classifier)"
        )


def load_state(model: GoogLeNet, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load a model file (ours, or a bare state_dict) into ``model``; returns the file's meta."""
    blob = read_weights_file(path)
    _load_blob(model, blob, str(path), strict)
    return dict(blob.get("meta", {})) if "model" in blob else {}


def _load_blob(model: GoogLeNet, blob: dict[str, Any], source: str, strict: bool = True) -> None:
    state_dict = blob["model"] if "model" in blob and isinstance(blob["model"], dict) else blob
    check_fits(model, state_dict, source)
    if not model.aux_logits:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{source}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_model(
    path: str | Path, num_classes: int | None = None, aux_logits: bool | None = None
) -> tuple[GoogLeNet, dict[str, Any]]:
    """Rebuild the model a file describes and load it. ``num_classes`` different from the file's
    replaces the classifier (fine-tuning); ``aux_logits=False`` drops the aux heads."""
    blob = read_weights_file(path)
    if "meta" not in blob or "model" not in blob:
        raise WeightsError(f"{path}: not a model file of this project (no 'meta'); use load_state")
    meta = dict(blob["meta"])
    model = GoogLeNet(
        variant=meta["variant"],
        num_classes=meta["num_classes"],
        aux_logits=meta["aux_logits"] if aux_logits is None else aux_logits,
        transform_input=meta.get("transform_input", False),
        init_weights=False,
    )
    _load_blob(model, blob, str(path))  # the blob already read: the file is read once
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model, meta


def load_torchvision_weights(
    path: str | Path | None = None, num_classes: int | None = None, aux_logits: bool = True
) -> GoogLeNet:
    """torchvision's ImageNet GoogLeNet as our ``torchvision`` variant.

    ``path``: a local copy of torchvision's ``googlenet-1378be20.pth``. Without it, torchvision's
    own download is tried (needs internet). Its weights expect ``transform_input=True``. The file
    also holds aux heads, which torchvision says are not pretrained ("make sure to train them"):
    ``aux_logits=True`` loads them from the file (random where a file has none) and they need
    training; ``aux_logits=False`` drops them, as torchvision's ``googlenet(weights=...)`` does by default.
    """
    if path is None:
        from torchvision.models import GoogLeNet_Weights

        try:
            state_dict = GoogLeNet_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as err:
            raise WeightsError(
                f"torchvision ImageNet weights: download failed ({err}); {TORCHVISION_WEIGHTS_HINT}"
            ) from err
    else:
        state_dict = read_weights_file(path)
    if not aux_logits:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}
    model = GoogLeNet("torchvision", num_classes=1000, aux_logits=aux_logits, transform_input=True)
    check_fits(model, state_dict, str(path or "torchvision"))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or any(not k.startswith(("aux1.", "aux2.")) for k in missing):
        raise WeightsError(
            f"{path}: not torchvision GoogLeNet weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if num_classes is not None and num_classes != 1000:
        model.reset_classifier(num_classes)
    return model
