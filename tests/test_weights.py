"""Weights files: our checkpoints round-trip, foreign ones fail with a message that says why."""

from __future__ import annotations

import pytest
import torch
import torchvision

from backbone import googlenet
from backbone.weights import WeightsError, load_model, load_state, load_torchvision_weights, save_model


def test_save_and_load_model_round_trip(tmp_path) -> None:
    model = googlenet("bn", num_classes=5).eval()
    path = tmp_path / "m.pth"
    save_model(path, model, {"class_names": ["a", "b", "c", "d", "e"]})
    loaded, meta = load_model(path)
    assert meta["class_names"] == ["a", "b", "c", "d", "e"] and meta["variant"] == "bn"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file


def test_load_model_for_fine_tuning_replaces_the_classifier(tmp_path) -> None:
    save_model(tmp_path / "m.pth", googlenet("paper", num_classes=5))
    model, _ = load_model(tmp_path / "m.pth", num_classes=3, aux_logits=False)
    assert model.fc.out_features == 3 and model.aux1 is None


def test_other_variant_or_class_count_fails_with_a_message(tmp_path) -> None:
    save_model(tmp_path / "bn.pth", googlenet("bn", num_classes=5))
    with pytest.raises(WeightsError, match=r"bn\.pth: holds a 'bn' GoogLeNet, the model is 'paper'"):
        load_state(googlenet("paper", num_classes=5), tmp_path / "bn.pth")
    with pytest.raises(WeightsError, match="holds 5 classes, the model has 7"):
        load_state(googlenet("bn", num_classes=7), tmp_path / "bn.pth")
    save_model(tmp_path / "tv.pth", googlenet("torchvision", num_classes=5))
    with pytest.raises(WeightsError, match="holds a 'torchvision' GoogLeNet, the model is 'bn'"):
        load_state(googlenet("bn", num_classes=5), tmp_path / "tv.pth")


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(WeightsError, match="no such weights file"):
        load_model(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth: not a readable weights file") as info:
        load_model(tmp_path / "junk.pth")
    assert "\n" not in str(info.value)


def test_torchvision_weights_from_a_local_file(tmp_path) -> None:
    reference = torchvision.models.googlenet(
        weights=None, aux_logits=False, init_weights=True, transform_input=True
    )
    torch.save(reference.state_dict(), tmp_path / "googlenet-tv.pth")
    model = load_torchvision_weights(tmp_path / "googlenet-tv.pth").eval()
    assert model.transform_input and model.aux1 is not None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference.eval()(x))


def test_torchvision_file_with_aux_heads_loads_with_or_without_them(tmp_path) -> None:
    # torchvision's googlenet-*.pth holds aux heads too (not ImageNet-trained, torchvision says).
    reference = googlenet("torchvision", num_classes=1000, aux_logits=True, transform_input=True).eval()
    torch.save(reference.state_dict(), tmp_path / "googlenet-tv.pth")
    model = load_torchvision_weights(tmp_path / "googlenet-tv.pth", aux_logits=False).eval()
    assert model.aux1 is None and model.aux2 is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits)
    with_aux = load_torchvision_weights(tmp_path / "googlenet-tv.pth")  # the file's aux heads, not random
    torch.testing.assert_close(with_aux.aux1.fc2.weight, reference.aux1.fc2.weight)
