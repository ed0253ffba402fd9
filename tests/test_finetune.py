"""The fine-tuning engine: frozen stays bitwise frozen, what thaws trains, LRs are as set."""

from __future__ import annotations

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classifiers import classifier, task
from conftest import PREPROCESSING
from thaw.errors import UserError
from thaw.finetune import (
    FreezeUnfreeze,
    Full,
    Gradual,
    LinearProbe,
    TwoPhase,
    build_param_groups,
    discriminative_lrs,
    schedulers,
)
from thaw.models import create_backbone
from thaw.models.backbones import HEAD, STAGES
from thaw.models.backbones.torchvision import MODELS
from thaw.models.layer_groups import LayerGroup
from thaw.models.task import ClassificationTask

GROUPS = [*STAGES, HEAD]


def make_model(
    strategy, lr: float = 1e-2, weight_decay: float = 0.1, scheduler=None
) -> ClassificationTask:
    torch.manual_seed(0)
    return task(
        classifier(create_backbone("resnet18", weights=None), ["a", "b", "c"], PREPROCESSING),
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
        finetune=strategy,
        scheduler=scheduler,
    )


def loader(n: int = 24, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.arange(n) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=8)


class RecordOptimizer(pl.Callback):
    """Records, at every step, the optimizer's groups and which parameters it holds."""

    def __init__(self) -> None:
        self.group_counts: list[int] = []
        self.param_ids: list[frozenset[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.group_counts.append(len(groups))
        self.param_ids.append(frozenset(id(p) for g in groups for p in g["params"]))


@pytest.fixture
def fit(quiet_trainer):
    """fit(model, epochs, *callbacks): train on `loader()` with the model's freeze schedule."""

    def train(model: ClassificationTask, epochs: int, *extra: pl.Callback) -> pl.Trainer:
        trainer = quiet_trainer(
            max_epochs=epochs,
            callbacks=[FreezeUnfreeze(model.finetune), *extra],
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(model, train_dataloaders=loader())
        return trainer

    return train


def snapshot(group: LayerGroup) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (BatchNorm statistics) of the group, copied."""
    return {k: v.detach().clone() for k, v in group.tensors().items()}


def changed(before: dict[str, torch.Tensor], group: LayerGroup) -> dict[str, bool]:
    after = snapshot(group)
    return {k: not torch.equal(before[k], after[k]) for k in before}


def group_snapshots(model: ClassificationTask) -> dict[str, dict[str, torch.Tensor]]:
    return {name: snapshot(group) for name, group in model.model.layer_groups().items()}


def test_phase_one_freezes_backbone_bitwise_while_head_learns(fit):
    model = make_model(TwoPhase(freeze_epochs=1))
    before = group_snapshots(model)
    fit(model, epochs=1)
    groups = model.model.layer_groups()
    for name in GROUPS[:-1]:  # weights, biases and BatchNorm running stats alike
        diff = changed(before[name], groups[name])
        assert not any(diff.values()), (
            f"{name} moved while frozen: {[k for k, v in diff.items() if v]}"
        )
    assert all(changed(before["head"], groups["head"]).values())


def test_unfreeze_trains_top_groups_only_and_optimizer_never_changes(fit):
    model = make_model(TwoPhase(freeze_epochs=1, unfreeze_groups=2))
    recorder = RecordOptimizer()
    before = group_snapshots(model)
    trainer = fit(model, 2, recorder)
    groups = model.model.layer_groups()
    for name in ("stage1", "stage2"):
        assert not any(changed(before[name], groups[name]).values()), name
    for name in ("stage3", "stage4", "head"):
        diff = changed(before[name], groups[name])
        assert all(diff.values()), f"{name} did not train: {[k for k, v in diff.items() if not v]}"
    assert len(set(recorder.group_counts)) == 1 and len(set(recorder.param_ids)) == 1
    assert recorder.group_counts[0] == len(trainer.optimizers[0].param_groups)
    every_param = {id(p) for p in model.parameters()}
    assert recorder.param_ids[0] == every_param  # frozen ones too: nothing is added later


def test_bn_train_keeps_frozen_batchnorm_training(fit):
    model = make_model(TwoPhase(freeze_epochs=5, bn="train"))
    bn = model.model.backbone.bn1
    conv = model.model.backbone.conv1
    stats, affine, weight = bn.running_mean.clone(), bn.weight.clone(), conv.weight.clone()
    fit(model, epochs=1)
    assert not torch.equal(stats, bn.running_mean)
    assert not torch.equal(affine, bn.weight)
    assert torch.equal(weight, conv.weight)


@pytest.mark.parametrize(
    ("strategy", "epoch", "expected"),
    [
        (TwoPhase(freeze_epochs=2), 1, []),
        (TwoPhase(freeze_epochs=2), 2, GROUPS[:-1]),
        (TwoPhase(freeze_epochs=0, unfreeze_groups=1), 0, ["stage4"]),
        (Full(), 0, GROUPS[:-1]),
        (LinearProbe(), 99, []),
    ],
)
def test_strategy_phase_is_a_function_of_the_epoch(strategy, epoch, expected):
    assert strategy.trainable_groups(epoch, GROUPS[:-1]) == expected


def test_full_trains_everything_from_the_first_step_and_linear_probe_nothing_but_head(fit):
    model = make_model(Full())
    before = group_snapshots(model)
    fit(model, epochs=1)
    assert all(any(changed(before[n], model.model.layer_groups()[n]).values()) for n in GROUPS)

    model = make_model(LinearProbe())
    before = group_snapshots(model)
    fit(model, epochs=2)
    moved = [n for n in GROUPS if any(changed(before[n], model.model.layer_groups()[n]).values())]
    assert moved == ["head"]


def test_discriminative_lrs_are_geometric_from_ratio_to_head():
    lrs = discriminative_lrs(GROUPS, lr=1e-3, backbone_lr_ratio=0.01)
    assert lrs["head"] == pytest.approx(1e-3)
    assert lrs["stage1"] == pytest.approx(1e-5)
    ratios = [lrs[b] / lrs[a] for a, b in zip(GROUPS, GROUPS[1:], strict=False)]
    assert ratios == pytest.approx([0.01 ** (-1 / 4)] * 4)
    explicit = discriminative_lrs(GROUPS, 1e-3, 0.01, {"stage4": 5e-4})
    assert explicit["stage4"] == 5e-4 and explicit["stage3"] == lrs["stage3"]
    with pytest.raises(ValueError, match="layer9.*stage1"):
        discriminative_lrs(GROUPS, 1e-3, 0.1, {"layer9": 1.0})


def test_optimizer_groups_carry_their_lr_and_no_decay_on_bias_and_norm(fit):
    model = make_model(TwoPhase(backbone_lr_ratio=0.1, group_lrs={"stage2": 7e-4}), lr=1e-2)
    trainer = fit(model, epochs=1)
    expected = discriminative_lrs(GROUPS, 1e-2, 0.1, {"stage2": 7e-4})
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    }
    for group in trainer.optimizers[0].param_groups:
        assert group["lr"] == pytest.approx(expected[group["name"]])
        for p in group["params"]:
            decays = group["weight_decay"] > 0
            assert decays == (p.ndim > 1 and id(p) not in norm_params)
    assert {g["name"] for g in trainer.optimizers[0].param_groups} == set(GROUPS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_backbone_parameter_is_in_exactly_one_group(name):
    backbone = create_backbone(name, weights=None)
    assert list(backbone.groups) == GROUPS[:-1]
    model = task(
        classifier(backbone, ["a", "b"], PREPROCESSING),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        finetune=Full(),
    )
    groups = model.model.layer_groups()
    grouped = [id(p) for group in groups.values() for p in group.params]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    param_groups = build_param_groups(groups, dict.fromkeys(GROUPS, 0.1), 0.05)
    assert sum(len(g["params"]) for g in param_groups) == len(list(model.parameters()))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2)


def test_cosine_schedule_warms_up_then_decays_every_group_alike():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    sched = schedulers.cosine(
        opt, total_steps=12, steps_per_epoch=4, warmup_epochs=0.5, min_lr_ratio=0.1
    )["scheduler"]
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([0.5, 0.05]) and seen[1] == pytest.approx([1.0, 0.1])
    assert seen[-1][0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(a[1] == pytest.approx(a[0] / 10) for a in seen)


def test_onecycle_peaks_at_each_groups_own_lr():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    sched = schedulers.onecycle(opt, total_steps=20, steps_per_epoch=5, pct_start=0.25)["scheduler"]
    peaks = [0.0, 0.0]
    for _ in range(20):
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, opt.param_groups, strict=True)]
        opt.step()
        sched.step()
    assert peaks == pytest.approx([1.0, 0.1])


def test_onecycle_over_too_few_steps_is_a_user_error_not_a_division_by_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="of the run's 4 steps, exactly one step"):
        schedulers.onecycle(opt, total_steps=4, steps_per_epoch=2, pct_start=0.25)
    for steps in (2, 5):  # half a step of warm-up, or more than one, torch schedules
        schedulers.onecycle(opt, total_steps=steps, steps_per_epoch=2, pct_start=0.25)[
            "scheduler"
        ].step()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TwoPhase(bn="frozen"), r"finetune.bn='frozen'.*\['eval', 'train'\]"),
        (lambda: TwoPhase(backbone_lr_ratio=0), "backbone_lr_ratio=0"),
        (lambda: TwoPhase(unfreeze_groups=0), "unfreeze_groups=0"),
        (lambda: TwoPhase(unfreeze_groups=9).trainable_groups(5, GROUPS[:-1]), "has 4 groups"),
    ],
)
def test_bad_finetune_values_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_soft_targets_drive_the_loss_and_hard_labels_the_metrics():
    model = make_model(Full())
    model.eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    soft = torch.full((4, 3), 1 / 3)
    with torch.no_grad():
        hard_loss, logits, _ = model._shared_step((images, labels))
        soft_loss, same_logits, metric_labels = model._shared_step((images, labels, soft))
    assert torch.equal(logits, same_logits) and torch.equal(metric_labels, labels)
    assert torch.allclose(soft_loss, nn.functional.cross_entropy(logits, soft))
    assert not torch.allclose(soft_loss, hard_loss)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, []),
        (1, []),
        (2, ["stage4"]),
        (3, ["stage4"]),
        (4, ["stage3", "stage4"]),
        (9, GROUPS[:-1]),
    ],
)
def test_gradual_thaws_one_more_group_top_first(epoch, expected):
    strategy = Gradual(freeze_epochs=2, every_epochs=2)
    assert strategy.trainable_groups(epoch, GROUPS[:-1]) == expected


def test_gradual_trains_exactly_the_thawed_groups_each_epoch(fit):
    model = make_model(Gradual(freeze_epochs=1, every_epochs=1))
    moved_by_epoch = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.before = group_snapshots(pl_module)

        def on_train_epoch_end(self, trainer, pl_module):
            groups = pl_module.model.layer_groups()
            moved_by_epoch.append(
                [n for n in GROUPS if any(changed(self.before[n], groups[n]).values())]
            )

    fit(model, 3, Watch())
    assert moved_by_epoch == [["head"], ["stage4", "head"], ["stage3", "stage4", "head"]]


def test_thaw_warmup_ramps_each_group_from_its_own_thaw_step():
    strategy = Gradual(freeze_epochs=1, every_epochs=1, thaw_warmup_epochs=0.5)
    names = ["stage1", "stage3", "stage4", "stage4", "head"]
    factors = strategy.thaw_warmup(names, GROUPS[:-1], steps_per_epoch=4, max_epochs=3)
    table = [[round(f(step), 2) for step in range(12)] for f in factors]
    assert table[0] == [1.0] * 12  # stage1 never thaws within 3 epochs: never scaled
    assert table[2] == [0.0] * 4 + [0.5, 1.0] + [1.0] * 6  # stage4 thaws at step 4 (epoch 1)
    assert table[1] == [0.0] * 8 + [0.5, 1.0, 1.0, 1.0]  # stage3 thaws at step 8
    assert table[4] == [1.0] * 12  # the head is never frozen
    assert TwoPhase().thaw_warmup(names, GROUPS[:-1], 4, 3) is None


def test_thaw_warmup_multiplies_the_schedule_of_each_group(fit):
    model = make_model(
        Gradual(freeze_epochs=1, every_epochs=1, thaw_warmup_epochs=1.0),
        lr=1e-2,
        scheduler=partial(schedulers.constant),
    )
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
            seen.append((lrs["stage4"], lrs["head"]))

    fit(model, 3, Record())  # 24 images / 8 = 3 steps an epoch; stage4 thaws at step 3
    stage4_lr = discriminative_lrs(GROUPS, 1e-2, 0.1)["stage4"]
    assert [s[0] / stage4_lr for s in seen[3:7]] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert all(s[1] == pytest.approx(1e-2) for s in seen)
    with pytest.raises(ValueError, match="scheduler=onecycle cannot combine"):
        schedulers.onecycle(
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1),
            10,
            2,
            group_factors=[lambda s: 1.0],
        )
