"""scripts/lr_find.py: Lightning's LR range test, once per fine-tuning phase."""

from __future__ import annotations

import pytest
import torch

from conftest import REAL_FMNIST, TINY, load_script


def test_lr_find_suggests_a_sane_lr_per_phase_and_plots_it(tmp_path, capsys):
    """A toy problem that learns: 20 real Fashion-MNIST images per class."""
    lr_find = load_script("lr_find")
    data = [
        f"data.root={tmp_path / 'empty'}",
        "data.source.download=false",
        f"data.source.system_dir={REAL_FMNIST}",
        "data.samples_per_class=20",
    ]
    overrides = [*TINY, *data, "finetune.backbone_lr_ratio=0.1"]
    ramp = ["--steps", "24", "--min-lr", "1e-5", "--max-lr", "1.0"]
    suggestions = lr_find.main([*ramp, "--out", str(tmp_path), *overrides])
    assert set(suggestions) == {"head", "thawed"}  # two_phase: frozen for 1 epoch, then all
    for phase, lr in suggestions.items():
        assert lr is not None and 1e-4 < lr < 0.3, (phase, lr)
        assert (tmp_path / f"lr_find_{phase}.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "head + stage1, stage2, stage3, stage4 at their ratios" in printed
    assert f"optimizer.lr={suggestions['head']:.2e}" in printed


def test_the_ramped_lr_keeps_each_groups_ratio_to_the_head():
    lr_find = load_script("lr_find")
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(2)]
    groups = [{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.1}]
    optimizer = lr_find.keep_group_ratios(torch.optim.SGD)(groups)
    for group in optimizer.param_groups:
        group["lr"] = 2.0  # what the finder's ramp sets every group to
    for p in params:
        p.grad = torch.ones(1)
    optimizer.step()
    assert params[0].item() == pytest.approx(1 - 2.0 * 0.1) and params[1].item() == -1.0
    assert [group["lr"] for group in optimizer.param_groups] == [2.0, 2.0]
