"""tools/eval_cls.py and backbone.cls_eval: metrics, crop averaging, ensembles, outputs, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tool_loader import load_tool
from torch import nn
from torch.utils.data import DataLoader

from backbone import googlenet
from backbone.cls_eval import EnsembleMember, classification_report, predict_ensemble, predict_multi_crop
from backbone.synthetic import SHAPE_CLASSES, SyntheticShapesDataset
from backbone.transforms import MultiCropTransform, multi_crop, normalize_crops
from backbone.weights import save_model

eval_cls = load_tool("eval_cls")


def test_report_top1_top5_per_class_and_confusion_by_hand():
    names = [f"c{i}" for i in range(6)]
    probs = np.array(
        [
            [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],  # true 0, predicted 0
            [0.05, 0.30, 0.25, 0.20, 0.15, 0.05],  # true 5: ranked last (tie with c0 broken by index)
            [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # true 2: predicted 1, in the top 5
            [0.00, 0.00, 0.90, 0.10, 0.00, 0.00],  # true 2, predicted 2
        ]
    )
    report = classification_report(probs, np.array([0, 5, 2, 2]), names)
    assert report["top1_error"] == pytest.approx(50.0) and report["top1_accuracy"] == pytest.approx(50.0)
    assert report["top5_error"] == pytest.approx(25.0)
    assert report["per_class_accuracy"]["c0"] == 100.0 and report["per_class_accuracy"]["c2"] == 50.0
    assert report["per_class_accuracy"]["c5"] == 0.0 and report["per_class_accuracy"]["c3"] is None
    confusion = np.zeros((6, 6), int)
    confusion[0, 0] = confusion[5, 1] = confusion[2, 1] = confusion[2, 2] = 1
    assert report["confusion_matrix"] == confusion.tolist()
    small = classification_report(np.array([[0.2, 0.5, 0.3]]), np.array([0]), ["a", "b", "c"])
    assert "top5_error" not in small and small["top1_error"] == 100.0  # 3 classes: top-5 says nothing


class MeanColour(nn.Module):
    """Logits = mean of each normalised channel: 3 'classes', easy to recompute by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.is_contiguous(memory_format=torch.channels_last)
        return x.mean(dim=(2, 3)) * 4


def test_softmax_is_averaged_over_each_images_crops():
    dataset = SyntheticShapesDataset(3, 40, seed=1, transform=MultiCropTransform(32, 10))
    loader = DataLoader(dataset, batch_size=2)
    probs, labels = predict_multi_crop(MeanColour(), loader, max_crops_per_forward=7)  # chunks span images
    assert probs.shape == (3, 3) and labels.tolist() == dataset.targets
    for i in range(3):
        crops = normalize_crops(torch.from_numpy(multi_crop(dataset.load_image(i), 32, 10)))
        expected = torch.softmax(crops.mean(dim=(2, 3)) * 4, dim=1).mean(dim=0)
        np.testing.assert_allclose(probs[i], expected.numpy(), rtol=1e-5)
    assert not np.allclose(probs[0], probs[1])
    torch.manual_seed(0)
    with_conv = nn.Sequential(nn.Conv2d(3, 3, 1), MeanColour())
    low, _ = predict_multi_crop(with_conv, loader, bf16=True)
    full, _ = predict_multi_crop(with_conv, loader)
    assert not np.array_equal(low, full) and np.allclose(low, full, atol=0.02)  # bf16 reached the conv


class ShapeLogits(nn.Module):
    """MeanColour's three logits then zeros: one logit per synthetic shape class."""

    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.first = first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.first(x)
        return torch.cat([logits, logits.new_zeros(len(logits), len(SHAPE_CLASSES) - 3)], dim=1)


def test_predict_ensemble_averages_its_members_each_at_its_own_crop_size():
    dataset = SyntheticShapesDataset(6, 40, seed=1)
    torch.manual_seed(0)
    conv = ShapeLogits(nn.Sequential(nn.Conv2d(3, 3, 1), MeanColour()))
    members = [
        EnsembleMember("a/plain.pt", ShapeLogits(MeanColour()), 32),
        EnsembleMember("b/conv.pt", conv, 24),
    ]
    names, chosen = list(SHAPE_CLASSES), [0, 2, 5]
    result = predict_ensemble(
        members,
        dataset,
        names,
        10,
        indices=chosen,
        batch_size=2,
        workers=0,
        fuse=False,
        keep_member_probs=True,
    )
    alone = []
    for member in members:
        dataset.transform = MultiCropTransform(member.image_size, 10, train_size=member.image_size)
        loader = DataLoader(torch.utils.data.Subset(dataset, chosen), batch_size=3)
        alone.append(predict_multi_crop(member.model, loader)[0])
    np.testing.assert_allclose(result.probs, (alone[0] + alone[1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(result.member_probs[1], alone[1], rtol=1e-6)
    assert result.labels.tolist() == [dataset.targets[i] for i in chosen]
    assert [m["checkpoint"] for m in result.members] == ["a/plain.pt", "b/conv.pt"]
    assert [m["image_size"] for m in result.members] == [32, 24] and result.members[0]["seconds"] > 0
    plain = predict_ensemble(members[:1], dataset, names, 1, workers=0, fuse=False)
    assert plain.probs.shape == (6, len(names)) and plain.member_probs == []


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    meta = {
        "class_names": list(SHAPE_CLASSES),
        "image_size": 64,
        "data": {"root": None, "seed": 0, "synthetic_train_size": 32, "synthetic_val_size": 24},
    }
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = folder / f"model{seed}.pt"
        save_model(path, googlenet("bn", num_classes=len(SHAPE_CLASSES), aux_logits=False), meta)
        paths.append(path)
    return paths


def _run(argv: list[str]) -> int:
    return eval_cls.run_tool(eval_cls.main, eval_cls.get_args_parser().parse_args(argv))


def test_ensemble_of_two_checkpoints_averages_their_probabilities(checkpoints, tmp_path):
    out = tmp_path / "ens"
    argv = [
        "--crops",
        "10",
        "--limit",
        "4",
        "--image-size",
        "32",
        "--save-probs",
        "--out",
        str(out),
        "--workers",
        "0",
    ]
    assert _run(["--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[1]), *argv]) == 0
    result = json.loads((out / "eval_cls.json").read_text())
    saved = np.load(out / "probs.npz", allow_pickle=False)
    np.testing.assert_allclose(saved["ensemble"], (saved["model_0"] + saved["model_1"]) / 2, rtol=1e-6)
    assert not np.allclose(saved["model_0"], saved["model_1"])
    assert result["num_images"] == 4 and result["crops"] == 10 and len(result["checkpoints"]) == 2
    # The synthetic validation set of the checkpoint's data settings: indices 32.. of the generator.
    assert saved["labels"].tolist() == [(32 + i) % 8 for i in (0, 8, 15, 23)]
    expected = classification_report(
        saved["ensemble"].astype(np.float64), saved["labels"], list(SHAPE_CLASSES)
    )
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert set(result["per_class_accuracy"]) == set(SHAPE_CLASSES) and "top5_error" in result
    assert (out / "confusion.png").stat().st_size > 1000

    single = tmp_path / "single"
    assert _run(["--checkpoint", str(checkpoints[0]), *argv[:-5], "--out", str(single), "--save-probs"]) == 0
    np.testing.assert_allclose(
        np.load(single / "probs.npz")["ensemble"], saved["model_0"], rtol=1e-4, atol=1e-6
    )


def test_144_crops_run_end_to_end(checkpoints, tmp_path):
    argv = ["--checkpoint", str(checkpoints[0]), "--crops", "144", "--limit", "1", "--out", str(tmp_path)]
    assert _run([*argv, "--workers", "0", "--no-fuse", "--image-size", "32"]) == 0
    result = json.loads((tmp_path / "eval_cls.json").read_text())
    assert result["crops"] == 144 and result["num_images"] == 1


def test_user_errors_are_one_line_with_exit_code_2(checkpoints, tmp_path, capsys):
    assert _run(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.pt'}: no such weights file"
    (tmp_path / "flat").mkdir()
    assert _run(["--checkpoint", str(checkpoints[0]), "--data", str(tmp_path / "flat")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no class folders" in err and "\n" not in err
    for name in ("a", "b"):  # class folders of (undecodable, never read) distinct files
        (tmp_path / "two" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "two" / name / f"{i}.png").write_bytes(f"{name}{i}".encode())
    assert _run(["--checkpoint", str(checkpoints[0]), "--data", str(tmp_path / "two")]) == 2
    assert "trained on classes" in capsys.readouterr().err
    save_model(tmp_path / "bare.pt", googlenet("bn", num_classes=3, aux_logits=False), {"image_size": 32})
    assert _run(["--checkpoint", str(tmp_path / "bare.pt"), "--data", str(tmp_path / "two")]) == 2
    assert "the model has 3 classes, the data set 2" in capsys.readouterr().err
