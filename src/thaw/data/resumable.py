"""Loaders that can stop anywhere and resume exactly where they stopped.

Which samples an epoch visits, in which order, and how each one is augmented are pure functions
of (seed, epoch, sample), so a run resumed mid-epoch sees the very batches an uninterrupted run
would, whatever the number of workers or processes. Three kinds share that bookkeeping: a
DataLoader that augments image by image in workers, a DeviceLoader that keeps a uint8 set on
the training device and augments whole batches there, and a StreamingLoader that streams litdata
shards and augments their batches on the device. Each can serve cached backbone features
in place of images, in the same order (see thaw.finetune.FeatureCache).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

Batch = tuple[torch.Tensor, torch.Tensor]


def mix_seed(*values: int) -> int:
    """A 63-bit seed that changes with every value (a simple, stable polynomial hash)."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + value + 1) % (2**63 - 1)
    return seed


def _chunks(sampler: EpochSampler, size: int) -> Iterator[list[int]]:
    """The sampler's indices in lists of `size` (the last one shorter)."""
    indices = (index for index, _ in sampler)
    while chunk := list(islice(indices, size)):
        yield chunk


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (sample index, augmentation seed): shuffled by (seed, epoch) and sharded across
    distributed ranks (padded so every rank gets as many) when `shuffle`, in order on every rank
    otherwise (evaluation sees the whole set), starting `skip` samples in.

    With per-sample `weights` an epoch is `size` draws with replacement in proportion to them
    (class-balanced sampling), still a pure function of (seed, epoch); a sample drawn twice gets
    two augmentation seeds."""

    def __init__(
        self, size: int, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None
    ) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.weights = weights
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (as for a DistributedSampler)."""
        self.epoch = epoch

    def _shard(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            draws = torch.multinomial(self.weights, self.size, True, generator=generator)
            order = draws.tolist()
        rank, world = rank_and_world()
        per_rank = -(-self.size // world)
        order += order[: per_rank * world - self.size]
        return order[rank::world]

    def __len__(self) -> int:
        world = rank_and_world()[1] if self.shuffle else 1
        return -(-self.size // world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self.skip = self.skip, 0
        for position, index in enumerate(self._shard()[skip:], start=skip):
            if self.weights is None:
                yield index, mix_seed(self.seed, self.epoch, index)
            else:
                yield index, mix_seed(self.seed, self.epoch, index, position, rank_and_world()[0])


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights that draw every class equally often: 1 / its class's count."""
    counts = torch.bincount(labels.cpu())
    return 1.0 / counts[labels.cpu()].double()


class PositionedLoader(ABC):
    """What both loaders share: the (epoch, batches handed out) position that Lightning stores in
    checkpoints, the resume from it, and serving `cached` features instead of images.

    Subclasses have an EpochSampler `sampler`, a `batch_size`, the sample `labels`, and yield
    their image batches from `_image_batches`.
    """

    sampler: EpochSampler
    batch_size: int
    labels: torch.Tensor

    def __init__(self) -> None:
        self.cached: torch.Tensor | None = None  # one feature row per sample, set per epoch
        self._position = (0, 0)
        self._resume_at: tuple[int, int] | None = None

    @abstractmethod
    def _image_batches(self) -> Iterator[Any]:
        """This epoch's image batches, from the sampler's current position."""

    def _cached_batches(self, cached: torch.Tensor) -> Iterator[Batch]:
        labels = self.labels.to(cached.device)
        for chunk in _chunks(self.sampler, self.batch_size):
            rows = torch.tensor(chunk, device=cached.device)
            yield cached[rows], labels[rows]

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        done = 0
        if self._resume_at is not None and self._resume_at[0] == sampler.epoch:
            done = self._resume_at[1]
            sampler.skip = done * self.batch_size
        self._resume_at = None
        self._position = (sampler.epoch, done)
        batches = (
            self._image_batches() if self.cached is None else self._cached_batches(self.cached)
        )
        for batch in batches:
            done += 1
            self._position = (sampler.epoch, done)
            yield batch

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of it handed out so far)."""
        return self._position

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next pass over the saved epoch starts after the batches already handed out."""
        self.sampler.seed = state["seed"]
        self._resume_at = (state["epoch"], state["batches"])


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


class ResumableLoader(PositionedLoader, DataLoader):
    """A DataLoader over a map-style dataset of (image, label), augmented per image in workers."""

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        shuffle: bool = True,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        sampler = EpochSampler(len(dataset), seed, shuffle, weights)  # type: ignore[arg-type]
        # Its own generator: otherwise every iter() draws a worker seed from the global RNG,
        # and a resumed run, starting its iterator at another moment, shifts dropout by a draw.
        generator = torch.Generator().manual_seed(seed)
        DataLoader.__init__(
            self, SeededSamples(dataset), sampler=sampler, generator=generator, **kwargs
        )
        PositionedLoader.__init__(self)
        self.labels = labels if labels is not None else torch.empty(0, dtype=torch.long)

    def _image_batches(self) -> Iterator[Any]:
        return DataLoader.__iter__(self)


class DeviceLoader(PositionedLoader):
    """Batches gathered by index from a uint8 image tensor on the training device and transformed
    there as a whole (`transform(images, generator)`: see thaw.data.augment.batch): no workers,
    no per-image work. Each batch's random draws come from a generator seeded by (seed, epoch,
    rank, batch), so it too resumes exactly."""

    batch_sampler = None  # Lightning reads it from anything that has a sampler

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        seed: int,
        batch_size: int,
        shuffle: bool = True,
        device: torch.device | str = "cpu",
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.transform = transform
        self.batch_size = batch_size
        self.sampler = EpochSampler(len(labels), seed, shuffle, weights)
        self.generator = torch.Generator(self.device)

    def _image_batches(self) -> Iterator[Batch]:
        epoch, first = self.sampler.epoch, self.sampler.skip // self.batch_size
        rank = rank_and_world()[0] if self.sampler.shuffle else 0
        chunks = _chunks(self.sampler, self.batch_size)
        for number, chunk in enumerate(chunks, start=first):
            rows = torch.tensor(chunk, device=self.device)
            self.generator.manual_seed(mix_seed(self.sampler.seed, epoch, rank, number))
            yield self.transform(self.images[rows], self.generator), self.labels[rows]


class StreamingLoader(PositionedLoader):
    """litdata's StreamingDataLoader over a split's shards (thaw.data.sources.streaming.Shards):
    litdata shuffles them by (seed, epoch), splits them across DDP ranks and loader workers, and
    its loader state resumes mid-epoch; each uint8 batch is moved to the training device and
    transformed there as a whole, as DeviceLoader's are, its draws seeded by (seed, epoch, rank,
    batch). The sampler keeps the epoch and the seed, and draws the order only of cached
    features (thaw.finetune.FeatureCache), which litdata does not serve."""

    batch_sampler = None

    def __init__(
        self,
        shards: Any,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        seed: int,
        batch_size: int,
        num_workers: int,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.shards = shards
        self.labels = labels
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.sampler = EpochSampler(len(shards), seed)
        self.generator = torch.Generator(self.device)
        self._streaming: Any = None
        self._saved: dict[str, Any] | None = None  # litdata's state, to resume from

    @property
    def streaming(self) -> Any:
        """The StreamingDataLoader, built on first use with the sampler's seed."""
        if self._streaming is None:
            self._streaming = self.shards.loader(
                self.batch_size, self.num_workers, self.sampler.seed
            )
        return self._streaming

    def __len__(self) -> int:
        return super().__len__() if self.cached is not None else len(self.streaming)

    def _image_batches(self) -> Iterator[Batch]:
        epoch, first = self.sampler.epoch, self.sampler.skip // self.batch_size
        self.sampler.skip = 0
        streaming = self.streaming
        if first and self._saved is not None:
            streaming.load_state_dict(self._saved)
        else:
            # litdata counts an epoch up before it shuffles: its order is a function of the
            # epoch Lightning is in, whatever ran before in this process.
            streaming.current_epoch = epoch
        self._saved = None
        rank = rank_and_world()[0]
        for number, batch in enumerate(streaming, start=first):
            images = batch["image"].to(self.device, non_blocking=True)
            self.generator.manual_seed(mix_seed(self.sampler.seed, epoch, rank, number))
            yield self.transform(images, self.generator), batch["label"].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "litdata": self.streaming.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.sampler.seed:
            self._streaming = None  # the order is the saved seed's
        super().load_state_dict(state)
        self._saved = state["litdata"]
