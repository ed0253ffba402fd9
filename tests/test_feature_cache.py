"""A frozen, deterministic backbone's features are computed once and the head trains on them:
the same head as the uncached path, and an error where caching would change the result."""

from __future__ import annotations

import logging

import pytest
import torch

from thaw.train import run

CACHE_LOG = "thaw.finetune.feature_cache"
EXACT = ["trainer.deterministic=true", "test=false", "augment=none", "model.head_dropout=0.5"]


def final_state(cfg) -> dict[str, torch.Tensor]:
    path = f"{cfg.paths.output_dir}/checkpoints/last.ckpt"
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize(
    ("finetune", "loader"),
    [
        (["finetune=linear_probe"], "device"),
        (["finetune=two_phase", "finetune.freeze_epochs=2"], "dataloader"),
    ],
    ids=["linear_probe-device", "two_phase-dataloader"],
)
def test_cached_features_train_the_same_model(train_config, caplog, loader, finetune) -> None:
    common = [*EXACT, *finetune, f"data.loader={loader}", "trainer.max_epochs=3"]
    with caplog.at_level(logging.INFO, logger=CACHE_LOG):
        cached_cfg = train_config(*common, "finetune.cache_features=true", run="cached")
        cached = run(cached_cfg)
    assert [r for r in caplog.records if r.name == CACHE_LOG and "Cached" in r.message]
    plain_cfg = train_config(*common, "finetune.cache_features=false", run="plain")
    plain = run(plain_cfg)

    a, b = final_state(cached_cfg), final_state(plain_cfg)
    assert a.keys() == b.keys()
    for key in a:  # equal up to float rounding (features computed in other batch sizes)
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
    for key in ("val/acc", "val/loss", "train/loss_epoch"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-4), key


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["augment=basic"], r"augmented \(crop_padding=0.125, hflip=0.5, color_jitter=0.2\)"),
        (["augment=none", "finetune.bn=train"], "finetune.bn=train"),
        (["augment=none", "finetune=full"], "no frozen phase"),
    ],
)
def test_cache_features_true_where_it_cannot_be_says_why(train_config, overrides, reason) -> None:
    cfg = train_config(*overrides, "++finetune.cache_features=true")
    with pytest.raises(ValueError, match=f"cache_features=true.*{reason}"):
        run(cfg)


def test_auto_caches_only_a_deterministic_probe(train_config, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=CACHE_LOG):
        run(train_config("finetune=linear_probe", "trainer.max_epochs=1", run="augmented"))
    assert any("Not caching" in r.message and "augment=none" in r.message for r in caplog.records)
    assert not any("Cached" in r.message for r in caplog.records)


def test_a_val_loader_that_appears_late_is_cached_from_then_on(train_config, caplog) -> None:
    """Without a sanity check and with validation every 2nd epoch (as on resume), Lightning
    builds the val loader only at the first validation."""
    late_val = [
        "trainer.check_val_every_n_epoch=2",
        "++trainer.num_sanity_val_steps=0",
        "trainer.max_epochs=4",
    ]
    with caplog.at_level(logging.INFO, logger=CACHE_LOG):
        metrics = run(train_config(*EXACT, "finetune=linear_probe", *late_val))
    cached = [r.message for r in caplog.records if r.name == CACHE_LOG and "Cached" in r.message]
    assert len(cached) == 2 and "train set" in cached[0] and "val set" in cached[1]
    assert "val/acc" in metrics  # validated, from the cache, at epochs 2 and 4
