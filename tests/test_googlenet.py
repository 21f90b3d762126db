"""GoogLeNet: the paper's Table 1, shapes, aux heads, torchvision compatibility, inference fusion."""

from __future__ import annotations

import pytest
import torch
import torchvision

from backbone import GoogLeNetOutputs, googlenet
from backbone.inference import fuse_for_inference
from backbone.summary import compute_table1

# Table 1 of the paper, transcribed: (row, output size HxWxC, #1x1, #3x3 reduce, #3x3, #5x5 reduce,
# #5x5, pool proj, printed params in K, printed ops in M). None = blank in the paper.
PAPER_TABLE1 = [
    ("convolution", (112, 112, 64), None, None, None, None, None, None, 2.7, 34),
    ("max pool", (56, 56, 64), None, None, None, None, None, None, None, None),
    ("convolution", (56, 56, 192), None, 64, 192, None, None, None, 112, 360),
    ("max pool", (28, 28, 192), None, None, None, None, None, None, None, None),
    ("inception (3a)", (28, 28, 256), 64, 96, 128, 16, 32, 32, 159, 128),
    ("inception (3b)", (28, 28, 480), 128, 128, 192, 32, 96, 64, 380, 304),
    ("max pool", (14, 14, 480), None, None, None, None, None, None, None, None),
    ("inception (4a)", (14, 14, 512), 192, 96, 208, 16, 48, 64, 364, 73),
    ("inception (4b)", (14, 14, 512), 160, 112, 224, 24, 64, 64, 437, 88),
    ("inception (4c)", (14, 14, 512), 128, 128, 256, 24, 64, 64, 463, 100),
    ("inception (4d)", (14, 14, 528), 112, 144, 288, 32, 64, 64, 580, 119),
    ("inception (4e)", (14, 14, 832), 256, 160, 320, 32, 128, 128, 840, 170),
    ("max pool", (7, 7, 832), None, None, None, None, None, None, None, None),
    ("inception (5a)", (7, 7, 832), 256, 160, 320, 32, 128, 128, 1072, 54),
    ("inception (5b)", (7, 7, 1024), 384, 192, 384, 48, 128, 128, 1388, 71),
    ("avg pool", (1, 1, 1024), None, None, None, None, None, None, None, None),
    ("dropout", (1, 1, 1024), None, None, None, None, None, None, None, None),
    ("linear", (1, 1, 1000), None, None, None, None, None, None, 1000, 1),
]

# Rows whose printed params (K = 1024 weights) disagree with the paper's own channel columns by
# at least 1K, and rows whose printed ops disagree beyond rounding. Listed in the README.
PARAMS_DISAGREE = {
    "convolution 7x7", "inception (3b)", "inception (4a)", "inception (4b)", "inception (4c)",
    "inception (4d)", "inception (4e)", "inception (5a)", "inception (5b)",
}  # fmt: skip
OPS_DISAGREE = {"convolution 7x7", "inception (5a)"}


def weights_from_channel_columns(row_index: int) -> int:
    """Convolution/linear weights that the paper's channel columns imply for a Table 1 row."""
    label, _, c1, r3, c3, r5, c5, pp, _, _ = PAPER_TABLE1[row_index]
    in_channels = PAPER_TABLE1[row_index - 1][1][2] if row_index else 3
    if label.startswith("inception"):
        return in_channels * (c1 + r3 + r5 + pp) + 9 * r3 * c3 + 25 * r5 * c5
    if label == "convolution" and r3 is not None:  # the stem's 1x1 reduction + 3x3
        return in_channels * r3 + 9 * r3 * c3
    if label == "convolution":
        return 7 * 7 * 3 * 64
    if label == "linear":
        return 1024 * 1000
    return 0


def row_name(index: int) -> str:
    label = PAPER_TABLE1[index][0]
    return "convolution 7x7" if index == 0 else label


@pytest.mark.parametrize("variant", ["paper", "bn"])
def test_table1_follows_from_the_papers_channel_columns(variant: str) -> None:
    rows = compute_table1(googlenet(variant, init_weights=False), 224)
    assert [r.label for r in rows] == [p[0] for p in PAPER_TABLE1]
    params_disagree, ops_disagree = set(), set()
    for i, (row, paper) in enumerate(zip(rows, PAPER_TABLE1, strict=True)):
        h, w, _ = paper[1]
        assert row.output_size == paper[1], row.label
        expected_weights = weights_from_channel_columns(i)
        assert row.weights == expected_weights, row.label
        assert row.macs == expected_weights * (h * w if row.label != "linear" else 1), row.label
        if row.label.startswith("inception"):
            assert row.channels == tuple(paper[2:8])
        printed_params, printed_ops = paper[8], paper[9]
        if printed_params is not None and abs(row.weights / 1024 - printed_params) >= 1:
            params_disagree.add(row_name(i))
        # The paper prints whole millions, some rounded and some truncated: within 1M is its rounding.
        if printed_ops is not None and abs(row.macs / 1e6 - printed_ops) >= 1:
            ops_disagree.add(row_name(i))
    assert params_disagree == PARAMS_DISAGREE
    assert ops_disagree == OPS_DISAGREE


def test_paper_variant_layers_are_the_papers() -> None:
    model = googlenet("paper")
    assert model.inception3a.branch3[1].conv.kernel_size == (5, 5)
    assert model.maxpool4.kernel_size == 3
    assert model.dropout.p == 0.4
    assert isinstance(model.lrn1, torch.nn.LocalResponseNorm) and isinstance(
        model.lrn2, torch.nn.LocalResponseNorm
    )
    assert model.conv1.bn is None and model.conv1.conv.bias is not None
    assert (
        model.aux1.dropout.p == 0.7
        and model.aux1.fc1.out_features == 1024
        and model.aux1.conv.conv.out_channels == 128
    )
    bn = googlenet("bn")
    assert (
        bn.lrn1 is None and bn.conv1.bn is not None and bn.inception5b.branch3[1].conv.kernel_size == (5, 5)
    )


def test_top_level_child_names_follow_torchvision() -> None:
    names = [n for n, _ in googlenet("paper").named_children()]
    expected = ["conv1", "maxpool1", "lrn1", "conv2", "conv3", "lrn2", "maxpool2", "inception3a",
                "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
                "inception4e", "maxpool4", "inception5a", "inception5b", "aux1", "aux2", "avgpool",
                "dropout", "fc"]  # fmt: skip
    assert names == expected
    tv_names = {
        n
        for n, _ in torchvision.models.googlenet(
            weights=None, aux_logits=True, init_weights=False
        ).named_children()
    }
    assert set(names) - {"lrn1", "lrn2"} == tv_names


@pytest.mark.parametrize("variant", ["paper", "bn", "torchvision"])
@pytest.mark.parametrize("size", [64, 96, 128])
def test_stage_shapes_and_aux_outputs_at_other_sizes(variant: str, size: int) -> None:
    model = googlenet(variant, num_classes=7)
    x = torch.randn(2, 3, size, size)
    for info in model.feature_info:
        feats = model.eval().forward_features(x, info["name"])
        assert feats.shape[1] == info["channels"]
        assert feats.shape[-1] == -(-size // info["stride"])  # ceil: every pool uses ceil_mode
    model.eval()
    out = model(x)
    assert (
        isinstance(out, GoogLeNetOutputs)
        and out.logits.shape == (2, 7)
        and out.aux1 is None
        and out.aux2 is None
    )
    model.train()
    out = model(x)
    assert isinstance(out, GoogLeNetOutputs) and out.aux1.shape == (2, 7) and out.aux2.shape == (2, 7)


def test_feature_info_at_224() -> None:
    info = {d["name"]: (d["channels"], d["stride"]) for d in googlenet("paper").feature_info}
    assert info["conv1"] == (64, 2) and info["maxpool2"] == (192, 8)
    assert (
        info["inception3b"] == (480, 8)
        and info["inception4e"] == (832, 16)
        and info["inception5b"] == (1024, 32)
    )


def test_paper_aux_pooling_is_5x5_stride_3_at_14px_features() -> None:
    aux = googlenet("paper").aux1.eval()
    x = torch.randn(1, 512, 14, 14)
    pooled = torch.nn.functional.avg_pool2d(x, 5, 3)
    expected = aux.fc2(torch.relu(aux.fc1(torch.flatten(aux.conv(pooled), 1))))
    torch.testing.assert_close(aux(x), expected)
    # The adaptive pool of the torchvision variant uses other windows, so the two differ here.
    assert not torch.allclose(pooled, torch.nn.functional.adaptive_avg_pool2d(x, 4))


def test_gradients_reach_the_aux_heads() -> None:
    model = googlenet("bn", num_classes=5).train()
    out = model(torch.randn(2, 3, 64, 64))
    loss = out.logits.sum() + 0.3 * (out.aux1.sum() + out.aux2.sum())
    loss.backward()
    for head in (model.aux1, model.aux2):
        assert head.fc2.weight.grad is not None and head.fc2.weight.grad.abs().sum() > 0
        assert head.conv.conv.weight.grad.abs().sum() > 0
    assert model.conv1.conv.weight.grad.abs().sum() > 0


def test_aux_logits_false_has_no_aux_heads() -> None:
    model = googlenet("paper", aux_logits=False).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert out.aux1 is None and out.aux2 is None and not any(k.startswith("aux") for k in model.state_dict())


def test_forward_features_then_head_equals_forward() -> None:
    model = googlenet("bn", num_classes=4).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x).logits)
    with pytest.raises(ValueError, match="unknown stage"):
        model.forward_features(x, "inception9z")


def test_reset_classifier_changes_every_head() -> None:
    model = googlenet("paper", num_classes=1000)
    model.reset_classifier(3)
    out = model.train()(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == out.aux1.shape == out.aux2.shape == (1, 3) and model.num_classes == 3


@pytest.mark.parametrize("transform_input", [False, True])
def test_torchvision_state_dict_loads_strict_and_matches(transform_input: bool) -> None:
    reference = torchvision.models.googlenet(
        weights=None, aux_logits=True, init_weights=True, transform_input=transform_input
    )
    ours = googlenet("torchvision", transform_input=transform_input)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    reference.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, reference(x))
    # Training mode: same dropout draws in the same order, batch statistics in BatchNorm.
    reference.train(), ours.train()
    torch.manual_seed(1)
    ref_logits, ref_aux2, ref_aux1 = reference(x)
    torch.manual_seed(1)
    out = ours(x)
    torch.testing.assert_close(out.logits, ref_logits)
    torch.testing.assert_close(out.aux1, ref_aux1)
    torch.testing.assert_close(out.aux2, ref_aux2)


@pytest.mark.parametrize("variant", ["paper", "bn", "torchvision"])
def test_fused_inference_model_gives_the_same_outputs(variant: str) -> None:
    model = googlenet(variant, num_classes=10).eval()
    for m in model.modules():  # non-trivial statistics, so folding is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    fused = fuse_for_inference(model)
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.inception3a.fused_1x1.out_channels == 64 + 96 + 16
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x).logits
        got = fused(x.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert model.conv1.bn is not None or variant == "paper"  # the original is untouched


def test_unknown_variant_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown GoogLeNet variant 'resnet'"):
        googlenet("resnet")


@pytest.mark.parametrize("variant", ["bn", "paper"])
def test_forward_stages_in_two_parts_equals_forward_features(variant: str) -> None:
    model = googlenet(variant, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = model.forward_stages(x, "conv1", "inception4e")
        rest = model.forward_stages(trunk, "maxpool4", "inception5b")
        torch.testing.assert_close(rest, model.forward_features(x))
    with pytest.raises(ValueError, match="comes after"):
        model.forward_stages(x, "inception5b", "conv1")


def test_freeze_through_stops_gradients_and_keeps_batch_norm_statistics() -> None:
    model = googlenet("bn", num_classes=3)
    model.freeze_through("inception3b")
    assert not any(p.requires_grad for p in model.inception3b.parameters())
    assert all(p.requires_grad for p in model.inception4a.parameters())
    model.train()
    assert not model.conv1.bn.training and model.inception4a.training
    before = model.conv1.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(model.conv1.bn.running_mean, before)
    model.freeze_through(None)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown stage"):
        model.freeze_through("inception9z")
