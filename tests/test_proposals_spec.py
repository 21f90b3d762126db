"""detect/proposals/spec.py and build_proposer: the plan of cache directories, ensure_proposals for
consumers (build when missing, one-line refusal when stale), settings round trip, and one image
proposed exactly as the cache holds it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_proposals_cache import make_multibox_file, write_images

from backbone.image_io import read_image_rgb
from backbone.runtime.errors import UserError
from detect.proposals import methods
from detect.proposals.cache import ProposalCacheError, build_cache, load_cache
from detect.proposals.methods import (
    MultiBoxMethod,
    SelectiveSearchMethod,
    UnionMethod,
    build_proposer,
    cores_per_rank,
    propose_union,
)
from detect.proposals.selective_search import ss_settings
from detect.proposals.spec import (
    MultiBoxSpec,
    ProposalSpec,
    SelectiveSearchSpec,
    configured_method,
    ensure_proposals,
    plan_caches,
    proposal_settings,
    spec_from_settings,
)


def small_spec(tmp_path: Path, method: str = "ss", model: Path | None = None, **extra) -> ProposalSpec:
    return ProposalSpec(
        method=method,
        ss=SelectiveSearchSpec(preset="fast", min_size=4, max_proposals=60),
        multibox=MultiBoxSpec(model=None if model is None else str(model), top_k=5),
        cache_dir=str(tmp_path / "cache"),
        workers=1,
        shard_size=2,
        **extra,
    )


# ---- the plan ---------------------------------------------------------------------------------


def test_plan_names_directories_components_first_and_configured_last(tmp_path: Path) -> None:
    model = tmp_path / "mb.pth"
    model.write_bytes(b"not read by the plan")
    split_dir = tmp_path / "cache" / "fruit" / "test"
    ss = SelectiveSearchMethod(ss_settings("fast", min_size=4, max_proposals=60, seed=0))
    mb = MultiBoxMethod(str(model), 5)
    both = plan_caches(small_spec(tmp_path, "both", model), "fruit", "test")
    assert list(both) == ["SS fast", "MultiBox", "SS fast + MultiBox"]
    assert both["SS fast"] == (split_dir / "ss_fast", ss)
    assert both["MultiBox"] == (split_dir / "multibox_top5", mb)
    union = UnionMethod(((str(split_dir / "multibox_top5"), mb), (str(split_dir / "ss_fast"), ss)), 0.7)
    assert both["SS fast + MultiBox"] == (split_dir / "multibox_top5+ss_fast", union)
    assert (
        configured_method(small_spec(tmp_path, "both", model), "fruit", "test") == both["SS fast + MultiBox"]
    )
    assert list(plan_caches(small_spec(tmp_path, "ss", model), "fruit", "test")) == ["SS fast"]
    only_mb = plan_caches(small_spec(tmp_path, "multibox", model), "fruit", "test")
    assert only_mb == {"MultiBox": (split_dir / "multibox_top5", mb)}
    with pytest.raises(ValueError, match="multibox.model: no MultiBox model file given"):
        plan_caches(small_spec(tmp_path, "both"), "fruit", "test")
    with pytest.raises(ValueError, match="mb_missing.pth: MultiBox model file not found"):
        plan_caches(small_spec(tmp_path, "multibox", tmp_path / "mb_missing.pth"), "fruit", "test")
    with pytest.raises(ValueError, match="^ss: unknown selective search preset"):
        plan_caches(replace(small_spec(tmp_path), ss=SelectiveSearchSpec(preset="slowest")), "f", "t")


def test_report_plan_adds_the_baseline_and_needs_no_multibox_model(tmp_path: Path) -> None:
    model = tmp_path / "mb.pth"
    model.write_bytes(b"x")
    with_model = plan_caches(small_spec(tmp_path, "ss", model), "d", "s", report_baseline="quality")
    assert list(with_model) == ["SS quality", "SS fast", "MultiBox", "SS fast + MultiBox"]
    # The baseline is the plain preset with the configured filters.
    baseline = with_model["SS quality"][1].settings
    assert baseline == ss_settings("quality", min_size=4, max_proposals=60, seed=0)
    for method in ("ss", "both", "multibox"):  # without a model: selective search rows alone
        plan = plan_caches(small_spec(tmp_path, method), "d", "s", report_baseline="quality")
        assert list(plan) == ["SS quality", "SS fast"], method


def test_the_shipped_proposal_configs_plan_todays_methods(tmp_path: Path, monkeypatch) -> None:
    """Same methods (so the same fingerprints: existing caches stay valid) as tools/propose.py built
    before it moved onto spec.py: written out here by hand from its configs."""
    from tool_loader import load_tool

    from backbone.runtime.config import load_config

    monkeypatch.setenv("SHARED_DATA", str(tmp_path))
    propose = load_tool("propose")
    model = tmp_path / "mb.pt"
    model.write_bytes(b"x")
    repo = Path(__file__).resolve().parents[1]
    for name in ("fruit", "raccoon"):
        config_file = repo / "configs" / "det" / f"proposals_{name}.yaml"
        cfg = load_config(config_file, propose.ProposeConfig, [f"multibox.model={model}"])
        plan = plan_caches(cfg.proposals(), cfg.name, "test")
        split_dir = Path("runs/cache/proposals") / name / "test"
        ss = SelectiveSearchMethod(
            ss_settings("fast_x2", max_side=500, min_size=20.0, dedup_iou=1.0, max_proposals=None, seed=0)
        )
        mb = MultiBoxMethod(str(model), 200)
        union = UnionMethod(
            ((str(split_dir / "multibox_top200"), mb), (str(split_dir / "ss_fast_x2"), ss)), dedup_iou=0.7
        )
        assert plan == {
            "SS fast_x2": (split_dir / "ss_fast_x2", ss),
            "MultiBox": (split_dir / "multibox_top200", mb),
            "SS fast_x2 + MultiBox": (split_dir / "multibox_top200+ss_fast_x2", union),
        }
        assert plan["SS fast_x2 + MultiBox"][1].fingerprint() == union.fingerprint()


def test_settings_round_trip(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, "both", tmp_path / "mb.pth", union_dedup_iou=0.6)
    settings = json.loads(json.dumps(proposal_settings(spec)))  # as a model file would keep it
    assert spec_from_settings(settings) == spec
    assert spec_from_settings({}) == ProposalSpec()
    with pytest.raises(UserError, match="unknown key 'ss.min_sz'"):
        spec_from_settings({"ss": {"min_sz": 3}})


def test_cores_per_rank_divides_the_node_between_torchrun_processes(monkeypatch) -> None:
    assert not hasattr(methods, "default_workers")  # the dataset readers' default_workers differs
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores_per_rank() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert cores_per_rank() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cores_per_rank() == 1


# ---- proposing one image ----------------------------------------------------------------------


def test_build_proposer_gives_the_cached_boxes_for_ss_multibox_and_union(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 3)
    model = tmp_path / "mb.pth"
    make_multibox_file(model, seed=0)
    spec = replace(small_spec(tmp_path, "both", model), workers=2)  # the pool's workers, not in-process
    proposals, described = ensure_proposals(records, spec, "tiny", "test", progress=False)
    plan = plan_caches(spec, "tiny", "test")
    for name, (directory, method) in plan.items():
        cached = proposals if name == "SS fast + MultiBox" else load_cache(records, method, directory)
        propose = build_proposer(method)
        for i, record in enumerate(records):
            boxes, scores = propose(read_image_rgb(record.file_name))
            assert boxes.dtype == np.float32 and scores.dtype == np.float32 and boxes.shape[1] == 4
            np.testing.assert_array_equal(boxes, cached.boxes[i], err_msg=f"{name} image {i}")
            np.testing.assert_array_equal(scores, cached.scores[i], err_msg=f"{name} image {i}")
    union = plan["SS fast + MultiBox"][1]
    image = read_image_rgb(records[0].file_name)
    parts = [build_proposer(m) for _, m in union.components]
    np.testing.assert_array_equal(propose_union(image, parts, 0.7)[0], proposals.boxes[0])
    assert len(propose_union(image, parts, 1.0)[0]) > len(proposals.boxes[0])  # dedup did drop boxes
    # What a detector's model file keeps: enough to say what the proposals were and to rebuild them.
    assert described["kind"] == "union" and described["dedup_iou"] == 0.7
    assert described["multibox"] == {"model": str(model), "top_k": 5, "min_size": 20.0}
    assert described["directory"] == str(plan["SS fast + MultiBox"][0])
    assert spec_from_settings(described["settings"]) == spec


def test_build_proposer_threads(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    method = SelectiveSearchMethod(ss_settings("fast"))
    try:
        build_proposer(method)
        assert torch.get_num_threads() == before  # None: left alone
        build_proposer(method, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(TypeError, match="not a proposal method"):
        build_proposer("ss")  # type: ignore[arg-type]


def test_an_in_process_build_gives_the_callers_threads_back(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        method = SelectiveSearchMethod(ss_settings("fast", min_size=4))
        build_cache(records, method, tmp_path / "cache", workers=1, shard_size=2, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- ensure_proposals -------------------------------------------------------------------------


def test_ensure_proposals_builds_once_then_reads(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 3)
    spec = small_spec(tmp_path)
    directory, method = configured_method(spec, "tiny", "test")
    assert not directory.exists()
    first, described = ensure_proposals(records, spec, "tiny", "test", progress=False)
    assert described["kind"] == "selective_search" and "multibox" not in described
    shards = {p: p.stat().st_mtime_ns for p in directory.glob("shard_*.npz")}
    assert len(shards) == 2
    again, _ = ensure_proposals(records, spec, "tiny", "test", progress=False)
    assert {p: p.stat().st_mtime_ns for p in directory.glob("shard_*.npz")} == shards  # read, not rebuilt
    for a, b in zip(first.boxes, again.boxes, strict=True):
        np.testing.assert_array_equal(a, b)


def one_line_refusal(records, spec, message: str) -> str:
    with pytest.raises(ProposalCacheError, match=message) as caught:
        ensure_proposals(records, spec, "tiny", "test", progress=False)
    text = str(caught.value)
    directory, _ = configured_method(spec, "tiny", "test")
    assert "\n" not in text and text.endswith(f"; delete {directory} and run again to rebuild it")
    return text


def test_ensure_proposals_refuses_a_stale_or_foreign_cache_and_completes_an_interrupted_one(
    tmp_path: Path,
) -> None:
    records = write_images(tmp_path / "images", 3)
    spec = small_spec(tmp_path)
    directory, _ = configured_method(spec, "tiny", "test")
    ensure_proposals(records, spec, "tiny", "test", progress=False)
    # Other settings into the same directory (max_proposals is not part of its name).
    other = replace(spec, ss=replace(spec.ss, max_proposals=30))
    text = one_line_refusal(records, other, "stale proposal cache .changed: method.")
    assert text.startswith(str(directory))
    # Other images: one removed from the split, or renumbered.
    one_line_refusal(records[:2], spec, "changed: dataset, num_images")
    renumbered = [replace(r, image_id=r.image_id + 100) for r in records]
    one_line_refusal(renumbered, spec, "changed: dataset")
    # An interrupted build (a train_det killed while building its proposals), as the kill leaves it:
    # other settings still find it stale; the same settings complete it, keeping the finished shard.
    manifest = directory / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))
    (directory / "shard_00001.npz").unlink()
    kept = (directory / "shard_00000.npz").stat().st_mtime_ns
    one_line_refusal(records, other, "stale proposal cache .changed: method.")
    completed, _ = ensure_proposals(records, spec, "tiny", "test", progress=False)
    assert len(completed.boxes) == len(records) and json.loads(manifest.read_text())["complete"]
    assert (directory / "shard_00000.npz").stat().st_mtime_ns == kept
    # The advice works: once the directory is gone the next call rebuilds it.
    shutil.rmtree(directory)
    rebuilt, _ = ensure_proposals(records, spec, "tiny", "test", progress=False)
    assert len(rebuilt.boxes) == len(records) and json.loads(manifest.read_text())["complete"]
    # Settings that make no method at all.
    with pytest.raises(ProposalCacheError, match="^proposals: multibox.model: no MultiBox model"):
        ensure_proposals(records, small_spec(tmp_path, "both"), "t", "s")
