"""A training loader that can stop anywhere and resume exactly where it stopped.

Which samples an epoch visits, in which order, and how each one is augmented are pure functions
of (seed, epoch, sample), so a run resumed mid-epoch sees the very batches an uninterrupted run
would, whatever the number of workers or processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def _mix(*values: int) -> int:
    """A 63-bit seed that changes with every value (a simple, stable polynomial hash)."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + value + 1) % (2**63 - 1)
    return seed


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (sample index, augmentation seed): shuffled by (seed, epoch), sharded across
    distributed ranks (padded so every rank gets as many), starting `skip` samples in."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (as for a DistributedSampler)."""
        self.epoch = epoch

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        rank, world = _rank_and_world()
        per_rank = -(-self.size // world)
        order += order[: per_rank * world - self.size]
        return order[rank::world]

    def __len__(self) -> int:
        _, world = _rank_and_world()
        return -(-self.size // world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self.skip = self.skip, 0
        for index in self._shard()[skip:]:
            yield index, _mix(self.seed, self.epoch, index)


class SeededSamples(Dataset):
    """Draws each sample's random augmentation from its own seed, not the global RNG stream."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """A DataLoader whose `state_dict` says how many batches of which epoch it handed out;
    Lightning stores it in checkpoints and, on resume, `load_state_dict` makes the next pass
    over that epoch start after them."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, **kwargs: Any) -> None:
        sampler = EpochSampler(len(dataset), seed, shuffle)  # type: ignore[arg-type]
        # Its own generator: otherwise every iter() draws a worker seed from the global RNG,
        # and a resumed run, starting its iterator at another moment, shifts dropout by a draw.
        generator = torch.Generator().manual_seed(seed)
        super().__init__(SeededSamples(dataset), sampler=sampler, generator=generator, **kwargs)
        self._position = (0, 0)
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        done = 0
        if self._resume_at is not None and self._resume_at[0] == sampler.epoch:
            done = self._resume_at[1]
            sampler.skip = done * self.batch_size  # type: ignore[operator]
        self._resume_at = None
        self._position = (sampler.epoch, done)
        for batch in super().__iter__():
            done += 1
            self._position = (sampler.epoch, done)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches, "seed": self.sampler.seed}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.seed = state["seed"]  # type: ignore[attr-defined]
        self._resume_at = (state["epoch"], state["batches"])
