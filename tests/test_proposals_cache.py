"""Proposal cache: parallel build, reuse, invalidation (parameters, data set, model), resume, union."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_proposals_ss import blocky_image

from backbone import googlenet
from detect.datasets.records import DetectionRecord
from detect.proposals.cache import ProposalCacheError, build_cache, load_cache, read_cache, shard_path
from detect.proposals.methods import (
    MultiBoxMethod,
    SelectiveSearchMethod,
    UnionMethod,
    union_proposals,
)
from detect.proposals.multibox import MultiBoxArch, build_multibox, save_multibox
from detect.proposals.selective_search import selective_search, ss_settings

SS = SelectiveSearchMethod(ss_settings("fast", min_size=4))


def write_images(directory: Path, count: int, write: bool = True) -> list[DetectionRecord]:
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        path = directory / f"img_{i:03d}.png"
        if write:
            cv2.imwrite(str(path), blocky_image(seed=i)[:, :, ::-1])
        records.append(DetectionRecord(image_id=i + 1, file_name=str(path), width=128, height=96))
    return records


def expected_ss(records: list[DetectionRecord], method: SelectiveSearchMethod) -> list[np.ndarray]:
    return [selective_search(cv2.imread(r.file_name)[:, :, ::-1].copy(), method.settings) for r in records]


def test_parallel_build_matches_direct_extraction_and_is_reused(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 5)
    cache = tmp_path / "cache"
    summary = build_cache(records, SS, cache, workers=2, shard_size=2, progress=False)
    assert summary["computed"] == 3 and summary["reused"] == 0
    loaded = load_cache(records, SS, cache)
    for got, want in zip(loaded.boxes, expected_ss(records, SS), strict=True):
        np.testing.assert_array_equal(got, want)
    assert loaded.image_ids.tolist() == [1, 2, 3, 4, 5]
    assert (loaded.seconds > 0).all()
    assert all(np.all(np.diff(s) < 0) for s in loaded.scores)  # rank order kept as falling scores
    assert json.loads((cache / "manifest.json").read_text())["complete"] is True
    read, manifest = read_cache(records, cache)  # what train_det uses: the method from the manifest
    assert (
        manifest["method"]["kind"] == "selective_search" and manifest["method"]["settings"]["min_size"] == 4
    )
    for got, want in zip(read.boxes, loaded.boxes, strict=True):
        np.testing.assert_array_equal(got, want)
    again = build_cache(records, SS, cache, workers=2, shard_size=2, progress=False)
    assert again["computed"] == 0 and again["reused"] == 3
    with np.load(shard_path(cache, 0), allow_pickle=False) as shard:  # plain arrays, no pickle
        assert shard["boxes"].dtype == np.float32


def test_parameter_change_invalidates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = write_images(tmp_path / "images", 3)
    cache = tmp_path / "cache"
    build_cache(records, SS, cache, workers=1, shard_size=2, progress=False)
    bigger = SelectiveSearchMethod(ss_settings("fast", min_size=30))
    with pytest.raises(ProposalCacheError, match="stale proposal cache .changed: method"):
        load_cache(records, bigger, cache)
    with caplog.at_level(logging.WARNING):
        summary = build_cache(records, bigger, cache, workers=1, shard_size=2, progress=False)
    assert "stale proposal cache (changed: method)" in caplog.text
    assert summary["computed"] == 2 and summary["reused"] == 0
    for got, want in zip(load_cache(records, bigger, cache).boxes, expected_ss(records, bigger), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ProposalCacheError, match="stale"):
        load_cache(records, SS, cache)  # the old parameters' cache is gone, not silently reused


def test_a_copied_or_moved_data_set_keeps_its_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = write_images(tmp_path / "images", 3)
    cache = tmp_path / "cache"
    build_cache(records, SS, cache, workers=1, shard_size=2, progress=False)
    before = json.loads((cache / "manifest.json").read_text())
    moved = tmp_path / "copied"  # new paths and new dates, the same bytes (a fresh copy of the data)
    moved.mkdir()
    for record in records:
        target = moved / Path(record.file_name).name
        target.write_bytes(Path(record.file_name).read_bytes())
        os.utime(target, ns=(1, 1))
    copies = [
        DetectionRecord(r.image_id, str(moved / Path(r.file_name).name), r.width, r.height) for r in records
    ]
    with caplog.at_level(logging.INFO):
        kept = load_cache(copies, SS, cache)
    assert "same bytes: cache kept" in caplog.text
    for got, want in zip(kept.boxes, expected_ss(records, SS), strict=True):
        np.testing.assert_array_equal(got, want)
    after = json.loads((cache / "manifest.json").read_text())
    assert after["fingerprint"] == before["fingerprint"]
    assert after["stat_signature"] != before["stat_signature"]  # refreshed: the next reader hashes nothing

    def no_hashing(path: str) -> str:
        raise AssertionError(f"{path} hashed although no image changed since the last read")

    monkeypatch.setattr("detect.proposals.cache._file_digest", no_hashing)
    read_cache(copies, cache)
    assert build_cache(copies, SS, cache, workers=1, shard_size=2, progress=False)["computed"] == 0


def test_a_read_only_cache_of_touched_images_is_still_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = write_images(tmp_path / "images", 2)
    cache = tmp_path / "cache"
    build_cache(records, SS, cache, workers=1, shard_size=2, progress=False)
    os.utime(records[0].file_name, ns=(1, 1))  # a new date, the same bytes

    def read_only(cache_dir: Path, manifest: dict) -> None:
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr("detect.proposals.cache._write_manifest", read_only)
    with caplog.at_level(logging.WARNING):
        assert len(load_cache(records, SS, cache)) == 2
    assert "cannot record the images' new dates" in caplog.text


def test_data_set_change_invalidates(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 3)
    cache = tmp_path / "cache"
    build_cache(records, SS, cache, workers=1, shard_size=2, progress=False)
    cv2.imwrite(records[1].file_name, blocky_image(seed=99)[:, :, ::-1])  # same name, new content
    with pytest.raises(ProposalCacheError, match="changed: dataset"):
        load_cache(records, SS, cache)
    with pytest.raises(ProposalCacheError, match="changed: dataset"):
        read_cache(records, cache)
    assert build_cache(records, SS, cache, workers=1, shard_size=2, progress=False)["computed"] == 2
    np.testing.assert_array_equal(load_cache(records, SS, cache).boxes[1], expected_ss(records[1:2], SS)[0])
    with pytest.raises(ProposalCacheError, match="changed: dataset, num_images"):
        load_cache(records[:2], SS, cache)  # an image removed from the split


def test_foreign_shard_is_recomputed(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 2)
    other = tmp_path / "other"
    build_cache(records, SS, other, workers=1, shard_size=1, progress=False)
    cache = tmp_path / "cache"
    build_cache(records, SS, cache, workers=1, shard_size=1, progress=False)
    x2 = SelectiveSearchMethod(ss_settings("fast_x2", min_size=4))
    build_cache(records, x2, other, workers=1, shard_size=1, progress=False)
    # A shard of another configuration copied in (e.g. by hand) must not be taken for this one.
    shard_path(cache, 1).write_bytes(shard_path(other, 1).read_bytes())
    with pytest.raises(ProposalCacheError, match="missing or foreign shard"):
        load_cache(records, SS, cache)
    assert build_cache(records, SS, cache, workers=1, shard_size=1, progress=False)["computed"] == 1


def test_resume_after_killed_run(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 10)
    cache = tmp_path / "cache"
    slow = SelectiveSearchMethod(ss_settings("quality", min_size=4))  # ~0.1-0.3 s per image
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from pathlib import Path
        from test_proposals_cache import write_images
        from detect.proposals.cache import build_cache
        from detect.proposals.methods import SelectiveSearchMethod
        from detect.proposals.selective_search import ss_settings
        records = write_images(Path(sys.argv[2]) / "images", 10, write=False)
        method = SelectiveSearchMethod(ss_settings("quality", min_size=4))
        build_cache(records, method, Path(sys.argv[2]) / "cache", workers=1, shard_size=1, progress=False)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__), str(tmp_path)])
    deadline = time.monotonic() + 120
    while len(list(cache.glob("shard_*.npz"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard_*.npz")}
    assert 2 <= len(done) < 10, "the child should have been killed part-way"
    with pytest.raises(ProposalCacheError, match="incomplete"):
        load_cache(records, slow, cache)
    summary = build_cache(records, slow, cache, workers=1, shard_size=1, progress=False)
    assert summary["reused"] >= len(done) and summary["computed"] == 10 - summary["reused"]
    for name, mtime in done.items():  # finished shards were kept, not recomputed
        assert (cache / name).stat().st_mtime_ns == mtime
    loaded = load_cache(records, slow, cache)
    for got, want in zip(loaded.boxes, expected_ss(records, slow), strict=True):
        np.testing.assert_array_equal(got, want)


def test_union_keeps_priority_order_and_drops_near_duplicates() -> None:
    multibox = (np.array([[0, 0, 10, 10], [0, 0, 10, 11]], np.float32), np.array([0.9, 0.8], np.float32))
    ss = (np.array([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 40, 40]], np.float32), np.ones(3, np.float32))
    boxes, scores = union_proposals([multibox, ss], dedup_iou=0.8)
    assert boxes.tolist() == [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 40, 40]]
    assert scores.tolist() == pytest.approx([0.9, 1.0, 1.0])
    assert len(union_proposals([multibox, ss], dedup_iou=0.95)[0]) == 4


def make_multibox_file(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    corners = np.sort(rng.uniform(0, 1, (8, 2, 2)), axis=1)
    priors = np.concatenate([corners[:, 0], corners[:, 1]], axis=1).astype(np.float32)
    arch = MultiBoxArch(
        variant="bn", stage="inception5b", num_priors=8, reduced_channels=8, grid=2, image_size=64
    )
    model = build_multibox(googlenet("bn", num_classes=2, aux_logits=False), priors, arch)
    save_multibox(path, model, arch, {"seed": seed})


def test_multibox_and_union_caches(tmp_path: Path) -> None:
    records = write_images(tmp_path / "images", 3)
    model_file = tmp_path / "multibox.pth"
    make_multibox_file(model_file, seed=0)
    multibox = MultiBoxMethod(str(model_file), top_k=5)
    build_cache(records, multibox, tmp_path / "mb", workers=2, shard_size=2, progress=False)
    build_cache(records, SS, tmp_path / "ss", workers=1, shard_size=2, progress=False)
    union = UnionMethod(((str(tmp_path / "mb"), multibox), (str(tmp_path / "ss"), SS)), dedup_iou=0.7)
    build_cache(records, union, tmp_path / "union", shard_size=2, progress=False)
    mb, ss, both = (
        load_cache(records, m, tmp_path / d) for m, d in ((multibox, "mb"), (SS, "ss"), (union, "union"))
    )
    for i in range(3):
        # At most top_k, none under min_size (20 px) once clipped: the untrained net's boxes vary.
        assert 1 <= len(mb.boxes[i]) <= 5 and np.all(np.diff(mb.scores[i]) <= 0)
        assert (mb.boxes[i][:, 2:] - mb.boxes[i][:, :2] >= 20).all()
        assert (mb.boxes[i][:, 2:] <= [128, 96]).all() and (mb.boxes[i] >= 0).all()
        want = union_proposals([(mb.boxes[i], mb.scores[i]), (ss.boxes[i], ss.scores[i])], 0.7)
        np.testing.assert_array_equal(both.boxes[i], want[0])
        assert both.seconds[i] == pytest.approx(mb.seconds[i] + ss.seconds[i])
    make_multibox_file(model_file, seed=1)  # retrained into the same path
    with pytest.raises(ProposalCacheError, match="changed: method"):
        load_cache(records, multibox, tmp_path / "mb")
    with pytest.raises(ProposalCacheError, match="changed: method"):
        load_cache(records, union, tmp_path / "union")


def test_real_images_with_odd_content(tmp_path: Path) -> None:
    """Fruit images include RGBA PNGs behind .jpg names and photos well over 1000 px."""
    from conftest import shared_data_dir

    from detect.datasets import open_detection_dataset

    records = open_detection_dataset(shared_data_dir("fruit") / "test")[0].records
    odd = ["apple_79.jpg", "banana_87.jpg", "apple_81.jpg"]  # two RGBA PNGs, a 1500 x 1749 JPEG
    picked = [r for r in records if Path(r.file_name).name in odd]
    assert len(picked) == 3
    method = SelectiveSearchMethod(ss_settings("fast_x2", max_side=300))
    build_cache(picked, method, tmp_path / "cache", workers=2, shard_size=2, progress=False)
    loaded = load_cache(picked, method, tmp_path / "cache")
    for record, boxes in zip(picked, loaded.boxes, strict=True):
        assert len(boxes) > 10
        assert (boxes[:, 2] <= record.width).all() and (boxes[:, 3] <= record.height).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 20).all()  # min_size in original pixels
