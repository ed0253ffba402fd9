"""An LR range test that knows the fine-tuning phases.

Lightning's `lr_find` ramps the learning rate up over a short fit and suggests the one where the
loss falls fastest. Here it runs once per phase of the strategy: for the head with the backbone
frozen, and for the phase where the strategy thaws backbone groups, with each thawed group kept
at its ratio to the head (`finetune.backbone_lr_ratio`, `group_lrs`, `layer_decay`). The x axis
and the suggestion are the head's LR, which is `optimizer.lr`:

    python scripts/lr_find.py data=imagefolder data.root=path/to/photos finetune=two_phase
    python scripts/lr_find.py --steps 200 --out lr_find experiment=fmnist_transfer \\
        source_checkpoint=<run>/checkpoints/best.ckpt

Writes <out>/lr_find_<phase>.png (loss against LR, the suggestion marked) and prints the
suggested overrides. It changes no config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import matplotlib
import pytorch_lightning as pl
import torch
from pytorch_lightning.tuner import Tuner

from thaw.build import build_datamodule, build_strategy, build_task
from thaw.config import compose_config
from thaw.finetune import FinetuneStrategy, FreezeUnfreeze
from thaw.hardware import instantiate_trainer

matplotlib.use("Agg")


def keep_group_ratios(factory: Callable[..., torch.optim.Optimizer]) -> Callable[..., Any]:
    """The optimizer `factory` makes, stepping each group at `lr x (its LR / the head's)`.

    Lightning's finder sets every group to the same ramped LR; the ratio each group had is kept
    in the group (`lr_scale`) and applied for the step only, so the optimizer's `lr` stays the
    head's and the finder's curve is against it."""

    def make(param_groups: list[dict]) -> torch.optim.Optimizer:
        head_lr = max(group["lr"] for group in param_groups)
        for group in param_groups:
            group["lr_scale"] = group["lr"] / head_lr
        optimizer = factory(param_groups)
        step = optimizer.step

        def scaled_step(self: torch.optim.Optimizer, closure: Callable | None = None) -> Any:
            ramped = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] *= group["lr_scale"]
            try:
                return step(closure)
            finally:
                for group, lr in zip(optimizer.param_groups, ramped, strict=True):
                    group["lr"] = lr

        # Bound, as torch's LR schedulers expect of optimizer.step (they wrap it).
        optimizer.step = MethodType(scaled_step, optimizer)  # type: ignore[method-assign]
        return optimizer

    make.keywords = getattr(factory, "keywords", {})  # type: ignore[attr-defined]  # lr, wd
    return make


class AtEpoch(FreezeUnfreeze):
    """The strategy's phase of `epoch`, whichever epoch the finder's short fit is in."""

    def __init__(self, strategy: FinetuneStrategy, epoch: int) -> None:
        super().__init__(strategy)
        self.epoch = epoch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, self.epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, self.epoch)


def phases(strategy: FinetuneStrategy, groups: list[str], max_epochs: int) -> dict[str, int]:
    """The first epoch of each phase: `head` (the backbone frozen) and `thawed` (the first epoch
    that trains backbone groups), where the strategy has them within `max_epochs`."""
    found: dict[str, int] = {}
    for phase in strategy.phases(max(1, max_epochs), groups):
        found.setdefault("thawed" if phase.groups else "head", phase.first)
    return found


def find(cfg: Any, epoch: int, args: argparse.Namespace) -> tuple[float | None, Any, list[str]]:
    """Lightning's range test in the phase of `epoch`: the suggested head LR, the finder, and
    the groups that trained."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    strategy = build_strategy(cfg)
    model = build_task(cfg, datamodule, strategy)
    model.optimizer_factory = keep_group_ratios(model.optimizer_factory)
    trainer = instantiate_trainer(
        cfg.trainer,
        devices=1,
        strategy="auto",
        max_epochs=args.steps,  # enough epochs for the ramp, whose steps end the fit
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AtEpoch(strategy, epoch)],
    )
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=datamodule,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        num_training=args.steps,
        update_attr=False,
    )
    trained = strategy.trainable_groups(epoch, list(model.model.backbone_groups))
    return finder.suggestion(), finder, trained


def main(argv: list[str] | None = None) -> dict[str, float | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps of the LR ramp")
    parser.add_argument("--min-lr", type=float, default=1e-7)
    parser.add_argument("--max-lr", type=float, default=1.0)
    parser.add_argument("--out", default="lr_find")
    parser.add_argument("overrides", nargs="*", help="train.py overrides")
    args = parser.parse_args(argv)

    out = Path(args.out)
    cfg = compose_config("train", args.overrides, out / "run")
    strategy = build_strategy(cfg)
    groups = [f"stage{i}" for i in range(1, 5)]
    suggestions: dict[str, float | None] = {}
    for phase, epoch in phases(strategy, groups, cfg.trainer.max_epochs).items():
        suggestion, finder, trained = find(cfg, epoch, args)
        figure = finder.plot(suggest=suggestion is not None)
        out.mkdir(parents=True, exist_ok=True)
        figure.savefig(out / f"lr_find_{phase}.png", dpi=100)
        suggestions[phase] = suggestion
        what = "head only" if not trained else f"head + {', '.join(trained)} at their ratios"
        found = f"optimizer.lr={suggestion:.2e}" if suggestion else "no clear minimum"
        print(f"{phase} (epoch {epoch}, {what}): {found}  ({out}/lr_find_{phase}.png)")
    if len(suggestions) == 2 and all(suggestions.values()):
        print(
            "One optimizer.lr serves both phases: the thawed phase's suggestion is the safer one "
            f"(optimizer.lr={min(suggestions.values()):.2e})."  # type: ignore[type-var]
        )
    return suggestions


if __name__ == "__main__":
    main()
