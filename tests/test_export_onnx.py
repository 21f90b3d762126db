"""ONNX export (backbone/export.py, tools/export_onnx.py): onnxruntime equals PyTorch, batch is dynamic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image
from tool_loader import load_tool
from torch import nn

from backbone.export import (
    FirstOutput,
    check_onnx,
    export_classifier_onnx,
    export_module_onnx,
    onnx_session,
    run_onnx,
)
from backbone.googlenet import GoogLeNet
from backbone.runtime import run_tool
from backbone.weights import save_model
from detect.rcnn.export import check_shared_onnx, export_shared_onnx
from detect.rcnn.model import (
    RegionClassifierArch,
    build_region_classifier,
    load_detector,
    save_detector,
)

onnx = pytest.importorskip("onnx", reason="the optional 'export' extra (make test installs it)")
pytest.importorskip("onnxruntime", reason="the optional 'export' extra (make test installs it)")

SIZE = 64  # every stride of the network still divides it


export_tool = load_tool("export_onnx")


def trained_looking(variant: str, num_classes: int = 5) -> GoogLeNet:
    """A model whose BatchNorm layers are not the identity, so folding them is really tested:
    random affine parameters and running statistics measured on random images (as training would
    leave them, so activations, and the logits, stay of order one)."""
    return calibrate(GoogLeNet(variant, num_classes=num_classes, aux_logits=True))


def calibrate(model: GoogLeNet) -> GoogLeNet:
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) * 0.5 + 0.75)
            norm.bias.copy_(torch.rand(norm.num_features, generator=generator) * 0.2 - 0.1)
            norm.momentum = None  # cumulative average over the calibration batches
        if norms:
            model.train()
            for _ in range(2):
                model(torch.randn(4, 3, SIZE, SIZE, generator=generator))
    return model.eval()


@pytest.mark.parametrize("variant", ["bn", "paper"])
def test_classifier_export_matches_pytorch_with_dynamic_batch(variant: str, tmp_path: Path) -> None:
    model = trained_looking(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_classifier_onnx(model, tmp_path / f"{variant}.onnx", SIZE)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched

    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions before export
    assert [o.name for o in graph.output] == ["logits"]  # aux heads and the named tuple are gone
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    if variant == "paper":
        assert model.lrn1 is not None and "AveragePool" in ops  # LocalResponseNorm made it through

    session = onnx_session(path)
    for batch in (1, 3):  # one file, both batch sizes
        inputs = torch.randn(batch, 3, SIZE, SIZE)
        out = run_onnx(session, inputs)
        assert out.shape == (batch, 5)
        reference = model(inputs).logits.detach().numpy()
        assert np.abs(reference).max() > 1e-3  # the comparison is not between two near-zero outputs
        assert check_onnx(session, model, inputs) < 1e-4
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-4)


def test_generic_export_of_a_region_classifier_like_module(tmp_path: Path) -> None:
    # The region classifier's crop mode: (N, 3, S, S) warped regions -> (N, C + 1) probabilities.
    regions = FirstOutput(trained_looking("bn", num_classes=4), softmax=True)
    path = export_module_onnx(
        regions, tmp_path / "regions.onnx", torch.zeros(2, 3, SIZE, SIZE), ["regions"], ["probs"]
    )
    session = onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["regions"]
    assert [o.name for o in session.get_outputs()] == ["probs"]
    inputs = torch.randn(5, 3, SIZE, SIZE)
    np.testing.assert_allclose(run_onnx(session, inputs).sum(axis=1), 1.0, atol=1e-5)
    assert check_onnx(path, regions, inputs) < 1e-5


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "model.pt"
    meta = {"image_size": SIZE, "class_names": ["a", "b", "c", "d", "e"]}
    save_model(path, trained_looking("bn"), meta)
    return path


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(90, 70), (64, 120)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run(argv: list[str]) -> int:
    return run_tool(export_tool.main, export_tool.get_args_parser().parse_args(argv))


def test_tool_exports_checks_and_prints_the_difference(checkpoint: Path, tmp_path: Path, capsys) -> None:
    images = write_images(tmp_path / "images")
    argv = ["--checkpoint", str(checkpoint), *[a for p in images for a in ("--image", str(p))]]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "random batch 3" in printed and "2 real image(s)" in printed
    worst = float(re.search(r"^max abs difference (\S+) \(tolerance 0.001\)$", printed, re.M).group(1))
    assert 0 < worst < 1e-4
    info = json.loads((checkpoint.parent / "classifier.json").read_text())
    assert info["class_names"] == ["a", "b", "c", "d", "e"] and info["input"]["shape"][2:] == [SIZE, SIZE]
    assert max(info["max_abs_difference"].values()) == pytest.approx(worst, rel=1e-2)
    session = onnx_session(checkpoint.parent / "classifier.onnx")
    assert run_onnx(session, np.zeros((4, 3, SIZE, SIZE), np.float32)).shape == (4, 5)


def test_tool_fails_with_one_line_over_the_tolerance(checkpoint: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "tools/export_onnx.py", "--checkpoint", str(checkpoint),
        "--out", str(tmp_path / "o"), "--tolerance", "1e-12",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: .*classifier\.onnx: onnxruntime and PyTorch differ by \S+, over the tolerance 1e-12",
        last,
    )
    assert "max abs difference" in done.stdout


@pytest.mark.parametrize("problem", ["missing image", "no image size", "not a model"])
def test_tool_errors_are_one_line_exit_2(checkpoint: Path, tmp_path: Path, capsys, problem: str) -> None:
    argv = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    if problem == "missing image":
        argv += ["--image", str(tmp_path / "nope.jpg")]
        expected = "nope.jpg: file not found"
    elif problem == "no image size":
        save_model(checkpoint, trained_looking("bn"), {})
        expected = "checkpoint records no image_size; pass --image-size"
    else:
        checkpoint.write_bytes(b"not torch")
        expected = "not a readable weights file"
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1]


@pytest.fixture
def detector_checkpoint(tmp_path: Path) -> Path:
    """A train_det-style model file: 3 classes (4 outputs with background), 64 px square warps."""
    arch = RegionClassifierArch(variant="bn", num_classes=3, input_size=SIZE, padding=4, warp="square")
    detector = build_region_classifier(arch)
    calibrate(detector.backbone)
    path = tmp_path / "det" / "model.pt"
    save_detector(path, detector, {"class_names": ["x", "y", "z"], "data": {"shorter_side": 80}})
    return path


def test_tool_exports_a_detector_region_classifier(detector_checkpoint: Path, tmp_path: Path, capsys) -> None:
    images = write_images(tmp_path / "images")
    argv = ["--checkpoint", str(detector_checkpoint), *[a for p in images for a in ("--image", str(p))]]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "region_classifier.onnx" in printed and "2 real image(s)" in printed
    worst = float(re.search(r"^max abs difference (\S+) \(tolerance 0.001\)$", printed, re.M).group(1))
    assert 0 < worst < 1e-4
    folder = detector_checkpoint.parent
    info = json.loads((folder / "region_classifier.json").read_text())
    assert info["class_names"] == ["x", "y", "z", "__background__"]
    assert info["input"] == {"name": "regions", "shape": ["batch", 3, SIZE, SIZE]}
    assert info["output"] == {"name": "probs", "shape": ["batch", 4]}
    assert info["preprocessing"]["image_shorter_side"] == 80
    assert info["preprocessing"]["region_warp"].startswith(f"square to {SIZE}x{SIZE}, 4 px context")
    session = onnx_session(folder / "region_classifier.onnx")
    probs = run_onnx(session, np.random.default_rng(0).normal(size=(5, 3, SIZE, SIZE)))
    assert probs.shape == (5, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The same softmax the detector's own region scoring gives on these crops.
    detector, _ = load_detector(detector_checkpoint)
    assert detector.arch.warp == "square"  # the model file keeps the warp
    crops = torch.from_numpy(np.random.default_rng(1).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32))
    with torch.no_grad():
        expected = torch.softmax(detector.backbone(crops).logits, dim=1).numpy()
    np.testing.assert_allclose(run_onnx(session, crops), expected, rtol=0, atol=1e-4)


def test_tool_detector_over_tolerance_and_wrong_size_exit_2(
    detector_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    base = ["--checkpoint", str(detector_checkpoint), "--out", str(tmp_path / "o")]
    assert run([*base, "--tolerance", "1e-12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"error: .*region_classifier\.onnx: onnxruntime and PyTorch differ by .*", err[-1])
    assert run([*base, "--image-size", "96"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "warps regions to 64 px" in err[-1]


def test_shared_mode_exports_as_trunk_and_region_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = RegionClassifierArch(variant="bn", num_classes=3, mode="shared", input_size=SIZE, padding=4)
    detector = build_region_classifier(arch)
    calibrate(detector.backbone)
    trunk, head = export_shared_onnx(detector, tmp_path, (96, 128))
    # Another image size and box count than the export's: both axes are dynamic.
    image = torch.randn(1, 3, 120, 80)
    boxes = torch.tensor([[0.0, 0.0, 80.0, 120.0], [10.0, 20.0, 50.0, 70.0], [5.0, 5.0, 6.0, 6.0]])
    assert check_shared_onnx(detector, trunk, head, image, boxes) < 1e-4
    features = onnx_session(trunk).run(None, {"images": image.numpy()})[0]
    probs = onnx_session(head).run(None, {"features": features, "boxes": boxes.numpy()})[0]
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert probs.max() < 0.999 and np.ptp(probs, axis=0).max() > 1e-3  # not saturated, boxes differ
    with pytest.raises(ValueError, match="shared-mode"):
        crop = build_region_classifier(RegionClassifierArch(variant="bn", num_classes=3, input_size=SIZE))
        export_shared_onnx(crop, tmp_path / "crop", (96, 128))


def test_tool_exports_a_shared_mode_detector_as_three_files(tmp_path: Path, capsys) -> None:
    arch = RegionClassifierArch(variant="bn", num_classes=2, mode="shared", input_size=SIZE, padding=4)
    detector = build_region_classifier(arch)
    calibrate(detector.backbone)
    checkpoint = tmp_path / "shared" / "model.pt"
    save_detector(checkpoint, detector, {"class_names": ["a", "b"], "data": {"shorter_side": 80}})
    images = write_images(tmp_path / "images")
    assert run(["--checkpoint", str(checkpoint), "--image", str(images[0])]) == 0
    printed = capsys.readouterr().out
    for name in ("region_classifier.onnx", "trunk.onnx", "region_head.onnx"):
        assert (checkpoint.parent / name).is_file(), name
    assert f"shared mode, {images[0].name}: max abs difference" in printed
