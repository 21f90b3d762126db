"""Scale, simulated: a proposal cache far larger than what train_det may hold in memory.

``test_train_det_reads_a_100k_image_cache_in_bounded_memory`` writes, with the cache's own
``write_shard`` and a real manifest, a complete cache of 100,000 images x 2,000 boxes (R-CNN's
count: 4 GB of float32 boxes and scores on disk, in a temporary folder removed afterwards; the
same size is timed by benchmarks/bench_scale.py), then opens it in a child process exactly as
train_det does (``split_proposals`` -> ``RegionTrainDataset``), checks a random sample of images' candidates
against what was written, and compares the child's peak RSS with its RSS just before it opened the
cache (imports and records done; a current RSS, so any earlier transient peak cannot hide growth).
The difference stays under ``READ_BOUND_MB``: a reader that loaded the proposals would add 3.7 GiB.

The other tests pin the lazy reader's contract: reads by index or image id, pickled (a spawned
worker's copy), shared with forked workers, old shards without statuses, and compressed or
truncated shards refused.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from detect.datasets.records import DetectionRecord
from detect.proposals.cache import cache_fingerprint, load_cache
from detect.proposals.methods import SelectiveSearchMethod
from detect.proposals.selective_search import ss_settings
from detect.proposals.shards import read_shard, shard_path, write_shard
from detect.proposals.spec import ProposalSpec, configured_method

IMAGES, BOXES, SHARD_SIZE = 100_000, 2000, 1000
SKIPPED = range(0, IMAGES, 9973)  # recorded as undecodable: no proposals, status "skipped"
READ_BOUND_MB = 48
SAMPLE = 2000
BASE = np.stack([np.arange(BOXES), np.arange(BOXES), np.arange(BOXES) + 30, np.arange(BOXES) + 20], 1)


def expected_proposals(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index``'s boxes (integers: exact in float32) and falling scores."""
    if index in SKIPPED:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    return (BASE + index % 101).astype(np.float32), np.linspace(1, 0, BOXES, dtype=np.float32)


def scale_records(image: str, count: int = IMAGES) -> list[DetectionRecord]:
    """``count`` records of one small file (the fingerprint stats each path; no image is decoded)."""
    gt = np.array([[10, 10, 60, 50]], np.float32)
    return [DetectionRecord(i + 1, image, 400, 300, gt, np.array([i % 3])) for i in range(count)]


def spec_for(cache_root: Path) -> ProposalSpec:
    return ProposalSpec(cache_dir=str(cache_root), workers=1, shard_size=SHARD_SIZE)


def write_cache(records: list[DetectionRecord], directory: Path, method, shard_size: int) -> None:
    """A complete cache as build_cache leaves it, without running any proposal method."""
    fingerprint, parts = cache_fingerprint(records, method)
    ids = np.array([r.image_id for r in records], np.int64)
    for shard, start in enumerate(range(0, len(records), shard_size)):
        indices = range(start, min(start + shard_size, len(records)))
        results = [(*expected_proposals(i), 0.5) for i in indices]
        status = [("skipped", "truncated file") if i in SKIPPED else ("", "") for i in indices]
        shard_ids = ids[indices.start : indices.stop]
        write_shard(shard_path(directory, shard), fingerprint, shard_ids, results, status)
    manifest = {"fingerprint": fingerprint, "parts": parts, "shard_size": shard_size, "complete": True}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


CHILD = textwrap.dedent(
    """
    import os, random, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from test_scale import SAMPLE, SKIPPED, expected_proposals, scale_records, spec_for
    from detect.datasets.records import DetectionDataset
    from detect.rcnn.data import RegionTrainDataset
    from detect.rcnn.pipeline import DetectionSplit, split_proposals

    records = scale_records(sys.argv[3])
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    sys.stdin.readline()  # the cache is written
    split = DetectionSplit(DetectionDataset(records, ["a", "b", "c"], [1, 2, 3]), "train")
    boxes, _ = split_proposals(split, spec_for(Path(sys.argv[2])), "scale", progress=False)
    dataset = RegionTrainDataset(records, boxes, 3, regions_per_image=32, in_memory=False)
    for index in random.Random(0).sample(range(len(records)), SAMPLE) + list(SKIPPED):
        candidates, _, labels = dataset.candidates(index)
        want = expected_proposals(index)[0]
        assert (candidates[1:] == want).all() and len(candidates) == 1 + len(want), index
        assert labels[0] == index % 3  # the ground-truth box, first
    # VmHWM: this process image's own peak. ru_maxrss would keep the peak of the process it was
    # spawned from (the test runner, over 1 GB late in the suite): exec carries it over.
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(before, peak_kb // 1024)
    """
)


def test_train_det_reads_a_100k_image_cache_in_bounded_memory() -> None:
    with tempfile.TemporaryDirectory(prefix="scale_cache_") as tmp:
        image = Path(tmp) / "image.jpg"
        image.write_bytes(b"\xff\xd8 never decoded")
        args = [sys.executable, "-c", CHILD, os.path.dirname(__file__), tmp, str(image)]
        # Started first: its imports (seconds) overlap the writing; it reads once told to.
        child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            directory, method = configured_method(spec_for(Path(tmp)), "scale", "train")
            write_cache(scale_records(str(image)), directory, method, SHARD_SIZE)
            out, err = child.communicate(b"go\n", timeout=120)
        finally:
            child.kill()
        assert child.returncode == 0, err.decode()[-3000:]
        on_disk = sum(p.stat().st_size for p in directory.glob("shard_*.npz")) / 2**20
    proposals_mb = 20 * BOXES * (IMAGES - len(SKIPPED)) / 2**20  # what a loading reader would add
    assert on_disk >= proposals_mb
    before, peak = (int(mb) for mb in out.split()[-2:])
    print(f"reader RSS {before} -> {peak} MB with {on_disk:.0f} MiB of proposals on disk")  # pytest -s
    assert peak - before < READ_BOUND_MB, (before, peak, on_disk)


SMALL = SelectiveSearchMethod(ss_settings("fast"))


@pytest.fixture
def small_cache(tmp_path: Path):
    image = tmp_path / "image.jpg"
    image.write_bytes(b"never decoded")
    records = scale_records(str(image), 50)
    write_cache(records, tmp_path / "cache", SMALL, shard_size=8)
    return records, tmp_path / "cache"


def read_in_worker(proposals, index: int, queue) -> None:
    queue.put(proposals.boxes[index].tolist())


def test_lazy_proposals_are_shared_with_forked_loader_workers(small_cache) -> None:
    records, directory = small_cache
    proposals = load_cache(records, SMALL, directory)
    proposals[3]  # a file now open, shared with the worker: pread moves no file position
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=read_in_worker, args=(proposals, 42, queue))
    worker.start()
    got = queue.get(timeout=60)
    worker.join(timeout=60)
    assert np.array_equal(got, expected_proposals(42)[0])
    np.testing.assert_array_equal(proposals.boxes[-1], expected_proposals(49)[0])  # the parent goes on


def test_lazy_proposals_by_index_and_image_id(small_cache) -> None:
    records, directory = small_cache
    opened = load_cache(records, SMALL, directory)
    opened[0]
    proposals = pickle.loads(pickle.dumps(opened))  # as a spawned loader worker gets it: no open files
    assert proposals.counts.tolist() == [len(expected_proposals(i)[0]) for i in range(50)]
    for index in (0, 7, 8, 49):  # shard edges
        boxes, scores = proposals.by_image_id(index + 1)
        np.testing.assert_array_equal(boxes, expected_proposals(index)[0])
        np.testing.assert_array_equal(scores, proposals.scores[index])
        assert boxes.flags.writeable  # a copy, not a view of the file
    assert proposals.status[0] == ("skipped", "truncated file") and proposals.status[1] == ("", "")
    with pytest.raises(KeyError):
        proposals.by_image_id(51)
    with pytest.raises(IndexError):
        proposals[50]
    assert len(list(proposals.boxes)) == 50  # iteration ends


def test_a_shard_written_before_statuses_is_still_read(small_cache) -> None:
    records, directory = small_cache
    path = shard_path(directory, 1)
    with np.load(path, allow_pickle=False) as data:
        old = {key: data[key] for key in data.files if key not in ("status", "status_detail")}
    np.savez(path, **old)
    proposals = load_cache(records, SMALL, directory)
    np.testing.assert_array_equal(proposals.boxes[9], expected_proposals(9)[0])
    assert proposals.status[9] == ("", "")


def test_a_compressed_or_truncated_shard_is_unreadable_not_misread(small_cache) -> None:
    records, directory = small_cache
    ids = np.array([r.image_id for r in records[8:16]])
    path = shard_path(directory, 1)
    fingerprint = json.loads((directory / "manifest.json").read_text())["fingerprint"]
    assert read_shard(path, fingerprint, ids) is not None
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    np.savez_compressed(path, **arrays)  # its boxes have no fixed offset to read from
    assert read_shard(path, fingerprint, ids) is None
    np.savez(path, **arrays)
    path.write_bytes(path.read_bytes()[:-5000])
    assert read_shard(path, fingerprint, ids) is None
