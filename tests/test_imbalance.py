"""Class imbalance, as a shop's catalogue has it: balanced sampling, class weights, focal loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from thaw.build import build_datamodule, build_strategy, build_task
from thaw.data.resumable import EpochSampler, balanced_weights
from thaw.models.loss import ClassificationLoss, resolve_class_weights

# A 10:1 catalogue: 1,000 images of class 0, 100 of class 1.
LABELS = torch.tensor([0] * 1000 + [1] * 100)


def epoch(sampler: EpochSampler, epoch: int, skip: int = 0) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    sampler.skip = skip
    return list(sampler)


def test_balanced_sampling_draws_every_class_alike_seeded_and_resumable():
    sampler = EpochSampler(len(LABELS), seed=3, weights=balanced_weights(LABELS))
    drawn = epoch(sampler, 0)
    assert len(drawn) == len(LABELS)
    minority = int((LABELS[[i for i, _ in drawn]] == 1).sum())
    # 1,100 draws at p = 1/2: 550 expected, standard deviation 16.6; four of them either way.
    assert abs(minority - 550) < 4 * 16.6, minority
    assert epoch(sampler, 0) == drawn  # a pure function of (seed, epoch)
    assert epoch(sampler, 1) != drawn
    assert epoch(sampler, 0, skip=700) == drawn[700:]  # resumed mid-epoch: the same draws
    seeds = [seed for _, seed in drawn]
    assert len(set(seeds)) == len(seeds)  # an image drawn twice is augmented twice, differently


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_data_sampler_balanced_reaches_both_loader_paths(train_config, loader):
    cfg = train_config("data.sampler=balanced", f"data.loader={loader}")
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    train = datamodule.train_dataloader()
    labels = datamodule.train_set.labels
    assert torch.equal(train.sampler.weights, balanced_weights(labels))
    assert datamodule.val_dataloader().sampler.weights is None  # evaluation sees every image
    with pytest.raises(ValueError, match="data.sampler must be one of"):
        build_datamodule(train_config("data.sampler=oversample"))


def test_class_weights_and_focal_loss_equal_hand_computed_values():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    weights = [1.0, 2.0, 3.0]

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(x) for x in row]
        return [e / sum(exps) for e in exps]

    probs = [softmax(row) for row in logits.tolist()]
    p0, p1 = probs[0][0], probs[1][2]
    plain = -(math.log(p0) + math.log(p1)) / 2
    weighted = -(1.0 * math.log(p0) + 3.0 * math.log(p1)) / (1.0 + 3.0)
    focal = -((1 - p0) ** 2 * math.log(p0) + (1 - p1) ** 2 * math.log(p1)) / 2
    focal_weighted = -(1.0 * (1 - p0) ** 2 * math.log(p0) + 3.0 * (1 - p1) ** 2 * math.log(p1)) / (
        1.0 + 3.0
    )
    cases = [
        (ClassificationLoss(), plain),
        (ClassificationLoss(class_weights=weights), weighted),
        (ClassificationLoss(focal_gamma=2.0), focal),
        (ClassificationLoss(class_weights=weights, focal_gamma=2.0), focal_weighted),
    ]
    for loss, expected in cases:
        assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # Soft targets (mixup) and label smoothing: gamma 0 is torch's cross_entropy, and a tiny gamma
    # is continuous with it.
    soft = F.one_hot(labels, 3).float() * 0.7 + 0.1
    for target in (labels, soft):
        tiny = ClassificationLoss(0.1, weights, focal_gamma=1e-9)(logits, target)
        ce = F.cross_entropy(logits, target, weight=torch.tensor(weights), label_smoothing=0.1)
        assert tiny.item() == pytest.approx(ce.item(), rel=1e-6)


def test_balanced_class_weights_count_the_training_split():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 4)
    assert resolve_class_weights("balanced", labels, ["a", "b", "c"]) == pytest.approx(
        [12 / 18, 12 / 6, 12 / 12]
    )
    with pytest.raises(ValueError, match=r"3 positive numbers in class order \['a', 'b', 'c'\]"):
        resolve_class_weights([1.0, 2.0], labels, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"no training images of \['c'\]"):
        resolve_class_weights("balanced", labels[:8], ["a", "b", "c"])


def test_loss_settings_reach_the_model(train_config):
    cfg = train_config("model.class_weights=balanced", "model.focal_gamma=2")
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    task = build_task(cfg, datamodule, build_strategy(cfg))
    counts = torch.bincount(datamodule.train_set.labels, minlength=10).double()
    expected = counts.sum() / (10 * counts)
    torch.testing.assert_close(task.criterion.weight.double(), expected)
    assert task.criterion.focal_gamma == 2
    assert "criterion.weight" not in task.state_dict()  # checkpoints load without it
