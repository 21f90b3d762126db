"""ONNX export of the classifier (and of any image -> scores module), checked with onnxruntime.

- ``export_classifier_onnx``: a GoogLeNet after ``fuse_for_inference`` (BatchNorm folded, the
  inception 1x1 convolutions merged), logits only, a dynamic batch axis.
- ``export_module_onnx``: the generic step, for any module taking ``(N, 3, S, S)`` images.
  ``export_classifier_onnx(..., softmax=True)`` uses it for the R-CNN region classifier in crop
  mode: warped regions in, ``(N, C+1)`` probabilities out.
- ``check_onnx``: the largest absolute difference between onnxruntime's output and PyTorch's.

onnx and onnxruntime are the optional ``export`` extra (``pip install -e '.[export]'``); they are
imported only when a function here needs them. The TorchScript-based exporter is used
(``dynamo=False``): the torch.export-based one needs onnxscript, and this network has no control
flow it would handle better.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from backbone.googlenet import GoogLeNet
from backbone.inference import fuse_for_inference
from backbone.runtime.errors import UserError
from backbone.runtime.files import atomic_write

DEFAULT_OPSET = 17
EXPORT_EXTRA_HINT = "pip install -e '.[export]' (onnx, onnxruntime)"


class ExportError(UserError, RuntimeError):
    """Export or check failed in a way the user can act on (missing package, bad file); one line."""


def _require(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise ExportError(f"ONNX export needs the {name!r} package: {EXPORT_EXTRA_HINT}") from None


class FirstOutput(nn.Module):
    """``module``'s first output as one tensor: ``GoogLeNetOutputs.logits`` (any tuple's first
    element), a plain tensor passed through; optionally softmaxed over the last axis."""

    def __init__(self, module: nn.Module, softmax: bool = False) -> None:
        super().__init__()
        self.module = module
        self.softmax = softmax

    def forward(self, x: Tensor) -> Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.softmax(out, dim=-1) if self.softmax else out


def export_module_onnx(
    module: nn.Module,
    path: str | Path,
    example_input: Tensor | Sequence[Tensor],
    input_names: Sequence[str] = ("images",),
    output_names: Sequence[str] = ("logits",),
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export ``module`` (eval mode, tensors in, tensors out) to ``path``; axis 0 of every input
    and output is the dynamic ``batch`` axis unless ``dynamic_axes`` names the dynamic axes itself.
    Checked with ``onnx.checker``; written atomically."""
    onnx = _require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    if dynamic_axes is None and dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    # Exported in memory and written by atomic_write: a killed export leaves the temporary that the
    # next run's start removes (the models here are far below protobuf's 2 GB).
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter warns that it is legacy, and about constant folding of strided slices.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(x.contiguous() for x in inputs),
            buffer,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(buffer.getvalue())
    atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
    return path


def prepare_classifier(model: GoogLeNet, softmax: bool = False) -> nn.Module:
    """What gets exported: an eval-mode copy with BatchNorm folded and the 1x1s merged, logits only
    (or their softmax, as the R-CNN region classifier scores regions)."""
    fused = fuse_for_inference(model, merge_1x1=True, channels_last=False)
    return FirstOutput(fused, softmax=softmax)


def export_classifier_onnx(
    model: GoogLeNet,
    path: str | Path,
    image_size: int,
    opset: int = DEFAULT_OPSET,
    *,
    softmax: bool = False,
    input_name: str = "images",
    output_name: str = "logits",
) -> Path:
    """Export a GoogLeNet classifier: input ``images`` ``(N, 3, S, S)`` normalised as by the eval
    transform, output ``logits`` ``(N, num_classes)``, N dynamic. ``model`` itself is not changed.

    ``softmax=True`` outputs probabilities instead: the detector's region classifier
    (``RegionClassifier.backbone``) on warped crops, ``(N, C + 1)`` with background last."""
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: nothing specialises to batch 1
    module = prepare_classifier(model, softmax=softmax)
    return export_module_onnx(module, path, example, (input_name,), (output_name,), opset)


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default torch's)."""
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{path}: onnxruntime cannot load it ({first})") from err


def run_onnx(session_or_path: Any, inputs: Tensor | np.ndarray) -> np.ndarray:
    """The first output of the model for one input batch, as float32 numpy."""
    session = onnx_session(session_or_path) if isinstance(session_or_path, (str, Path)) else session_or_path
    array = inputs.detach().cpu().numpy() if isinstance(inputs, Tensor) else np.asarray(inputs)
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(array, dtype=np.float32)})[0]


def torch_outputs(model: nn.Module, inputs: Tensor) -> np.ndarray:
    """PyTorch's reference output: ``model`` in eval mode (restored afterwards), first output only."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = FirstOutput(model)(inputs.float())
    finally:
        model.train(was_training)
    return out.detach().cpu().numpy()


def check_onnx(path: str | Path | Any, model: nn.Module, inputs: Tensor) -> float:
    """Max absolute difference between onnxruntime's output for ``inputs`` and ``model``'s (the
    unexported PyTorch model, so BatchNorm folding is checked too). ``path`` may be a session."""
    onnx_out = run_onnx(path, inputs)
    reference = torch_outputs(model, inputs)
    if onnx_out.shape != reference.shape:
        raise ExportError(
            f"{path}: ONNX output shape {tuple(onnx_out.shape)} "
            f"differs from PyTorch's {tuple(reference.shape)}"
        )
    return float(np.max(np.abs(onnx_out.astype(np.float64) - reference.astype(np.float64)), initial=0.0))
