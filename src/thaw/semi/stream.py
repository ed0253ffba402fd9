"""The unlabeled stream beside the labelled loader.

Which unlabeled images a step gets, and how each of their two views is augmented, are pure
functions of (seed, step): step s of a run takes the next `batch_size` positions of an endless
stream whose every pass over the pool is its own seeded permutation (each rank its own stretch of
positions). The labelled loader's (epoch, batch) position fixes the step, so the stream needs no
state of its own and a run resumed mid-epoch draws exactly the images and views an uninterrupted
run would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from thaw.data.dataset import ImageDataset
from thaw.data.resumable import PositionedLoader, SeededSamples, mix_seed, rank_and_world
from thaw.data.sources.base import ImageSet

# Keeps the stream's draws apart from the labelled loader's, which share the run's seed.
SALT = 0x5E31


class SemiBatch(NamedTuple):
    """A step's images: the labelled batch (images, labels[, soft targets]), the weak and strong
    views of its unlabeled images, and their true labels where known (-1 where not), which
    training uses only to report how often the pseudo-labels are right."""

    labelled: tuple[torch.Tensor, ...]
    weak: torch.Tensor
    strong: torch.Tensor
    hidden: torch.Tensor


class StreamPositions:
    """Step `step`'s unlabeled images: (pool index, augmentation seed) pairs."""

    def __init__(self, size: int, seed: int, batch_size: int) -> None:
        if size < 1:
            raise ValueError("the unlabeled pool is empty")
        self.size, self.seed, self.batch_size = size, seed, batch_size

    @lru_cache(maxsize=2)  # noqa: B019 - one stream per run, a pass or two alive at a time
    def _order(self, stream_pass: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, SALT, stream_pass))
        return torch.randperm(self.size, generator=generator)

    def step(self, step: int) -> list[tuple[int, int]]:
        rank, world = rank_and_world()
        start = (step * world + rank) * self.batch_size
        chosen = []
        for position in range(start, start + self.batch_size):
            stream_pass, offset = divmod(position, self.size)
            index = int(self._order(stream_pass)[offset])
            chosen.append((index, mix_seed(self.seed, SALT, position)))
        return chosen


ViewBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class DeviceViews:
    """Both views of a step's images, gathered from a uint8 pool on the training device and
    augmented there as whole batches (thaw.data.augment.batch), from a generator seeded by
    (seed, step, rank)."""

    def __init__(
        self,
        pool: ImageSet,
        positions: StreamPositions,
        weak: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        strong: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        device: torch.device | str,
    ) -> None:
        self.device = torch.device(device)
        self.images = pool.images.to(self.device)  # type: ignore[union-attr]
        self.hidden = pool.labels.to(self.device)
        self.positions, self.weak, self.strong = positions, weak, strong
        self.generator = torch.Generator(self.device)

    def __call__(self, step: int) -> ViewBatch:
        chosen = self.positions.step(step)
        rows = torch.tensor([index for index, _ in chosen], device=self.device)
        rank = rank_and_world()[0]
        self.generator.manual_seed(mix_seed(self.positions.seed, SALT, step, rank))
        images = self.images[rows]
        weak = self.weak(images, self.generator)
        return weak, self.strong(images, self.generator), self.hidden[rows]


class BothViews:
    """A per-image transform giving the weak and the strong view of one image."""

    def __init__(
        self, weak: Callable[[Any], torch.Tensor], strong: Callable[[Any], torch.Tensor]
    ) -> None:
        self.weak, self.strong = weak, strong

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weak(image), self.strong(image)


class _Steps:
    """A batch sampler of the stream from `first` on, without end."""

    def __init__(self, positions: StreamPositions, first: int) -> None:
        self.positions, self.first = positions, first

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.first
        while True:
            yield self.positions.step(step)
            step += 1


class LoadedViews:
    """Both views of a step's images, decoded and augmented per image in DataLoader workers,
    each image from its own seed. One worker pool streams step after step, epoch after epoch; it
    starts again only where the steps asked for jump (a resume)."""

    def __init__(
        self, dataset: ImageDataset, positions: StreamPositions, **loader_options: Any
    ) -> None:
        """`dataset` serves (BothViews of an image, its hidden label)."""
        self.dataset, self.positions, self.loader_options = dataset, positions, loader_options
        self._batches: Iterator[Any] | None = None
        self._next_step = -1

    def __call__(self, step: int) -> ViewBatch:
        if self._batches is None or step != self._next_step:
            # Its own generator, as ResumableLoader's: iter() would draw from the global RNG.
            loader = DataLoader(
                SeededSamples(self.dataset),
                batch_sampler=_Steps(self.positions, step),
                generator=torch.Generator().manual_seed(self.positions.seed),
                **self.loader_options,
            )
            self._batches = iter(loader)
        self._next_step = step + 1
        (weak, strong), hidden = next(self._batches)
        return weak, strong, hidden


class SemiLoader:
    """The labelled loader, each of its batches a SemiBatch with the step's unlabeled views from
    epoch `start_epoch` on (plain labelled batches before: the supervised warm-up). Its position
    and resume are the labelled loader's."""

    batch_sampler = None  # Lightning reads it from anything that has a sampler

    def __init__(
        self,
        labelled: PositionedLoader,
        views: Callable[[int], ViewBatch],
        start_epoch: int,
    ) -> None:
        self.labelled, self.views, self.start_epoch = labelled, views, start_epoch

    @property
    def sampler(self) -> Any:
        """The labelled sampler, whose epoch Lightning sets."""
        return self.labelled.sampler

    def __len__(self) -> int:
        return len(self.labelled)

    def __iter__(self) -> Iterator[Any]:
        if self.labelled.sampler.epoch < self.start_epoch:
            yield from self.labelled
            return
        per_epoch = len(self.labelled)
        for batch in self.labelled:
            epoch, done = self.labelled.position
            yield SemiBatch(tuple(batch), *self.views(epoch * per_epoch + done - 1))

    def state_dict(self) -> dict[str, int]:
        return self.labelled.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.labelled.load_state_dict(state)
