"""DataLoaders whose output depends only on (seed, epoch, sample index): exact mid-epoch resume.

Augmentation randomness normally lives in each worker's RNG, whose state depends on which
samples that worker already processed, so skipping to the middle of an epoch would change it.
:class:`SeededSamples` instead reseeds every RNG a transform may use right before each sample,
from (seed, epoch, index): results no longer depend on the number of workers, on worker
scheduling, or on where the epoch started.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from backbone.runtime.dist import ResumableDistributedSampler

# Attribute names under which datasets keep their (albumentations-style) random transforms.
_TRANSFORM_ATTRS = ("transform", "transforms", "augment", "augmentation", "target_transform")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def find_seedable(obj: Any, depth: int = 3) -> list[Any]:
    """Objects reachable through transform-like attributes (and Subset-like ``.dataset``) that
    own RNGs settable by ``set_random_state`` (albumentations Compose) or ``set_random_seed``."""
    found: list[Any] = []
    if depth < 0 or obj is None:
        return found
    if hasattr(obj, "set_random_state") or hasattr(obj, "set_random_seed"):
        found.append(obj)
        return found
    for name in (*_TRANSFORM_ATTRS, "dataset"):
        child = getattr(obj, name, None)
        if child is not None and child is not obj:
            found += find_seedable(child, depth - 1)
    return found


class SeededSamples(Dataset):
    """Wraps a map-style dataset; item ``i`` of epoch ``e`` is computed under seed f(seed, e, i).

    Python's ``random``, numpy's global RNG, torch's global RNG and every seedable transform found
    on the dataset are reseeded. In the main process (``num_workers=0``) the global RNG states are
    restored afterwards so the training loop's own randomness (dropout) is not disturbed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self._seedable = find_seedable(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):  # datasets that seed their own augmentation per epoch
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Forward e.g. ``classes`` or ``num_classes`` to the wrapped dataset.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        # ResumableLoader's sampler sends (epoch, index): persistent workers learn the epoch from it.
        if isinstance(key, tuple):
            epoch, index = key
            if epoch != self.epoch:
                self.set_epoch(epoch)
        else:
            index = key
        seed = sample_seed(self.seed, self.epoch, index)
        in_worker = get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        for obj in self._seedable:
            if hasattr(obj, "set_random_state"):
                obj.set_random_state(np.random.default_rng(seed), random.Random(seed))
            else:
                obj.set_random_seed(seed % 2**32)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def limit_worker_threads(worker_id: int) -> None:
    # Workers share the few cores with the training step: one OpenCV thread each.
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - cv2 is a dependency, but keep loaders usable without
        pass


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for each index of a :class:`ResumableDistributedSampler`, so that
    persistent DataLoader workers, which never see ``set_epoch`` calls made in the main process,
    still seed each sample by its epoch."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableLoader:
    """A DataLoader over :class:`SeededSamples` with a :class:`ResumableDistributedSampler`.

    ``epoch_batches(epoch, start_step)`` yields the batches of ``epoch`` from batch ``start_step``
    on, identical to the corresponding batches of an uninterrupted epoch. ``pin_memory`` defaults
    to whether CUDA is present, so that the steps' ``non_blocking`` copies overlap compute.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        self.dataset = SeededSamples(dataset, seed)
        self.batch_size = batch_size
        self.sampler = ResumableDistributedSampler(
            self.dataset, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.seed = seed
        self.drop_last = drop_last
        # A private generator: creating the iterator must not draw from the global torch RNG.
        self.generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=EpochTaggedSampler(self.sampler),
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            drop_last=drop_last,
            generator=self.generator,
            worker_init_fn=limit_worker_threads if num_workers > 0 else None,
            # New workers every epoch made the first flowers batch of each epoch wait ~2 s (of a
            # ~54 s epoch); the epoch travels with each index instead (EpochTaggedSampler).
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def batches_per_epoch(self) -> int:
        per_rank = self.sampler.samples_per_rank()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[Any]:
        if not 0 <= start_step <= self.batches_per_epoch():
            raise ValueError(f"start_step {start_step} outside 0..{self.batches_per_epoch()}")
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_index=start_step * self.batch_size)
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return iter(self.loader)

    def __len__(self) -> int:
        return self.batches_per_epoch()


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """In-order loader over this rank's disjoint share of ``dataset`` (no padding: exact metrics).

    Items are computed under per-sample seeds too, so evaluating never moves the global RNGs.
    """
    sampler = ResumableDistributedSampler(dataset, shuffle=False, pad=False)
    return DataLoader(
        SeededSamples(dataset, seed=0),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous copies to the GPU
        generator=torch.Generator(),  # leave the global RNG untouched (exact resume)
        worker_init_fn=limit_worker_threads if num_workers > 0 else None,
        persistent_workers=num_workers > 0,  # evaluated every few epochs: keep its workers
    )
