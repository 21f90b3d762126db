"""torchrun-aware distributed helpers; every function also works in a plain single process.

``init_distributed()`` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and
picks NCCL on GPU, gloo on CPU. Collective helpers are no-ops when not distributed, so library
code calls them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" (CUDA when available, else CPU), "cpu" or "cuda" as a device (GPU ``local_rank``)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and choose this process's device.

    ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        store = _store_for_this_attempt()
        store_args = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None, **store_args)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _store_for_this_attempt() -> dist.Store | None:
    """A clean key namespace for workers that torchrun's elastic agent restarted on one node.

    The agent keeps one key-value store across restarts, still holding the failed attempt's
    addresses: restarted gloo workers connected to dead peers ("Connection refused") or hung
    (pytorch/pytorch#135712). On a single node every worker has the same restart count, so it can
    prefix the keys; across nodes the counts may differ, so there torch's default stays.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if restart == 0 or not shared or os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=default_pg_timeout
    )
    return dist.PrefixStore(f"restart{restart}/default_pg", agent_store)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Sum each metric over ranks (all ranks must pass the same keys)."""
    keys = sorted(values)
    if not is_distributed():
        return {k: float(values[k]) for k in keys}
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist(), strict=True))


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Average each metric over ranks (unweighted: use sums and counts for exact means)."""
    world = get_world_size()
    return {k: v / world for k, v in all_reduce_sum(values).items()}


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not is_distributed():
        return flag
    packed = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable python data, in memory only), in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks; the first dimension may differ."""
    if not is_distributed():
        return tensor
    device = _collective_device()
    local = tensor.to(device)
    sizes = all_gather_object(int(local.shape[0]))
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ResumableDistributedSampler(Sampler[int]):
    """Shards (and shuffles) indices over ranks, and can start an epoch part-way through.

    Like ``torch.utils.data.DistributedSampler`` (same epoch-seeded permutation across ranks, padding
    or dropping so every rank gets the same count), plus ``set_epoch(epoch, start_index)``: skip the
    first ``start_index`` samples of this rank's share, which is how a resumed run continues with
    exactly the batches an uninterrupted run would have seen. ``pad=False`` gives each rank a
    disjoint share without duplicates (for exact evaluation); ranks may then differ by one sample.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        self.dataset_len = len(dataset)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} out of range for {self.num_replicas} replicas")
        self.shuffle, self.seed, self.drop_last, self.pad = shuffle, seed, drop_last, pad
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if start_index < 0 or start_index > self.samples_per_rank():
            raise ValueError(f"start_index {start_index} outside 0..{self.samples_per_rank()}")
        self.epoch, self.start_index = epoch, start_index

    def samples_per_rank(self) -> int:
        n, world = self.dataset_len, self.num_replicas
        if not self.pad:
            return len(range(self.rank, n, world))
        return n // world if self.drop_last else -(-n // world)

    def epoch_indices(self) -> list[int]:
        """This rank's full share of the current epoch (ignoring ``start_index``)."""
        n = self.dataset_len
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if self.pad:
            total = self.samples_per_rank() * self.num_replicas
            repeats = -(-total // max(n, 1))  # padding repeats the permutation, as torch does
            order = (order * repeats)[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_index :])

    def __len__(self) -> int:
        return self.samples_per_rank() - self.start_index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_index": self.start_index, "num_replicas": self.num_replicas}
