"""backbone.runtime.dist and .loader: sharding, mid-epoch restart, per-sample seeding, gloo collectives."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from backbone.runtime import dist as rdist
from backbone.runtime.loader import ResumableLoader, SeededSamples, build_eval_loader, sample_seed
from backbone.synthetic import SyntheticShapesDataset
from backbone.transforms import ProgressiveResizeTransform, train_transform


class NoisyDataset(Dataset):
    """Each item draws from all three global RNGs, like an augmentation pipeline might."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(
            [index, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64
        )


def test_sampler_shards_cover_the_data_and_agree_across_ranks():
    shards = [rdist.ResumableDistributedSampler(range(10), num_replicas=3, rank=r, seed=5) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    lists = [list(s) for s in shards]
    assert all(len(x) == 4 for x in lists)  # 10 padded to 12
    assert set().union(*map(set, lists)) == set(range(10))
    exact = [
        rdist.ResumableDistributedSampler(range(10), num_replicas=3, rank=r, pad=False) for r in range(3)
    ]
    assert sorted(i for s in exact for i in s) == list(range(10))  # eval: disjoint, no duplicates


def test_sampler_start_index_skips_exactly_and_epochs_reshuffle():
    sampler = rdist.ResumableDistributedSampler(range(50), num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start_index=7)
    assert list(sampler) == full[7:] and len(sampler) == len(full) - 7
    sampler.set_epoch(4)
    assert list(sampler) != full
    with pytest.raises(ValueError):
        sampler.set_epoch(0, start_index=26)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_mid_epoch_with_identical_batches(workers):
    reference = ResumableLoader(NoisyDataset(), 4, seed=11, num_workers=0)
    full = [b.clone() for b in reference.epoch_batches(epoch=1)]
    assert len(full) == len(reference) == 5  # 23 samples, batch 4, drop_last
    resumed = ResumableLoader(NoisyDataset(), 4, seed=11, num_workers=workers)
    tail = list(resumed.epoch_batches(epoch=1, start_step=3))
    assert len(tail) == 2
    for got, want in zip(tail, full[3:], strict=True):
        assert torch.equal(got, want)  # same indices and same "augmentation" draws
    other_epoch = next(iter(reference.epoch_batches(epoch=2)))
    assert not torch.equal(other_epoch, full[0])


def test_persistent_workers_follow_the_epoch():
    # Workers outlive the epoch (persistent_workers): each batch must still be that epoch's, as in
    # the main process, including after a mid-epoch restart on the same loader.
    reference = ResumableLoader(NoisyDataset(), 4, seed=5, num_workers=0)
    loader = ResumableLoader(NoisyDataset(), 4, seed=5, num_workers=1)
    assert loader.loader.persistent_workers
    for epoch, start in ((0, 0), (1, 0), (2, 3), (1, 1)):
        got = list(loader.epoch_batches(epoch, start))
        want = [b.clone() for b in reference.epoch_batches(epoch, start)]
        assert len(got) == len(want) == 5 - start
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_persistent_workers_resize_progressively_by_epoch():
    # The epoch reaches the worker's copy of the data set, and through it the transform's size.
    transform = ProgressiveResizeTransform(train_transform, lambda epoch: (16, 24, 32)[epoch])
    data = SyntheticShapesDataset(8, render_size=40, seed=0, transform=transform)
    loader = ResumableLoader(data, 4, seed=0, num_workers=1)
    for epoch, size in ((0, 16), (1, 24), (2, 32), (0, 16)):
        images, _ = next(iter(loader.epoch_batches(epoch)))
        assert images.shape == (4, 3, size, size)


def test_loading_in_the_main_process_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    loader = ResumableLoader(NoisyDataset(), 4, seed=0, num_workers=0)
    list(loader.epoch_batches(0))
    list(build_eval_loader(NoisyDataset(), 8))
    assert torch.equal(torch.rand(4), expected)  # dropout's RNG stream is unaffected by data loading


def test_seeded_samples_forward_epochs_and_attributes():
    class WithEpoch(NoisyDataset):
        classes = ["a", "b"]
        epoch = -1

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

    wrapped = SeededSamples(WithEpoch(), seed=0)
    wrapped.set_epoch(4)
    assert wrapped.dataset.epoch == 4 and wrapped.classes == ["a", "b"]
    assert sample_seed(0, 4, 1) != sample_seed(0, 4, 2) != sample_seed(0, 5, 1)


def test_collectives_are_identities_without_a_process_group():
    assert rdist.all_reduce_sum({"a": 2, "b": 1.5}) == {"a": 2.0, "b": 1.5}
    assert rdist.all_reduce_mean({"a": 3}) == {"a": 3.0}
    assert rdist.all_gather_object({"x": 1}) == [{"x": 1}]
    assert rdist.any_rank(True) and not rdist.any_rank(False)
    info = rdist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)


def _gloo_worker(rank: int, world: int, port: int, results) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    info = rdist.init_distributed("cpu")
    try:
        summed = rdist.all_reduce_sum({"correct": rank + 1.0, "count": 10.0})
        mean = rdist.all_reduce_mean({"loss": float(rank)})
        objects = rdist.all_gather_object(f"rank{rank}")
        tensor = rdist.all_gather_tensor(torch.full((rank + 1, 2), float(rank)))
        stop = rdist.any_rank(rank == 1)
        results.put((info.rank, summed, mean, objects, tensor.tolist(), stop, rdist.is_main_process()))
    finally:
        rdist.cleanup_distributed()


def test_collectives_over_two_gloo_processes():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank, summed, mean, objects, tensor, stop, is_main in got:
        assert summed == {"correct": 3.0, "count": 20.0}
        assert mean == {"loss": 0.5}
        assert objects == ["rank0", "rank1"]
        assert tensor == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # ragged first dimension
        assert stop is True and is_main == (rank == 0)
