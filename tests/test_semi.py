"""semi=fixmatch: the unlabeled loss gives gradient only through confident pseudo-labels, the
unlabeled stream never holds a labelled, validation or test image and skips the files that do
not decode; a run logs what the unlabeled images did. (Its mid-epoch resume is tested with the
rest of the stack in tests/test_resume.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from classifiers import classifier
from conftest import PREPROCESSING
from thaw.build import build_datamodule, trained_run_config
from thaw.data.unlabeled import read_unlabeled
from thaw.errors import UserError
from thaw.models import create_backbone, load_trained
from thaw.semi import FixMatch, WarmupCheck, fixmatch_loss
from thaw.semi.stream import SemiBatch, SemiLoader, StreamPositions
from thaw.train import run
from thaw.training_checks import check_training_config

# 8 generated training images per class: 1 validates, 4 train, 3 are unlabeled.
SEMI = [
    "semi=fixmatch",
    "semi.mu=2",
    "data.samples_per_class=4",
    "data.unlabeled_per_class=3",
]


# ---------------------------------------------------------------- the loss


def test_a_pseudo_label_below_the_threshold_gives_no_gradient() -> None:
    weak = torch.tensor([[9.0, 0.0, 0.0], [0.4, 0.2, 0.0], [0.0, 0.0, 8.0]], requires_grad=True)
    strong = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, mask, targets = fixmatch_loss(weak, strong, threshold=0.95)
    assert mask.tolist() == [True, False, True] and targets.tolist() == [0, 0, 2]
    loss.backward()
    assert torch.equal(strong.grad[1], torch.zeros(3))  # not confident: no gradient
    assert (strong.grad[[0, 2]] != 0).all()
    assert weak.grad is None  # the weak view is a target, never trained
    expected = torch.nn.functional.cross_entropy(strong[[0, 2]], targets[[0, 2]], reduction="sum")
    assert torch.allclose(loss, expected / 3)  # averaged over every unlabeled image


def test_at_threshold_1_the_unlabeled_loss_is_0_and_moves_no_weight() -> None:
    """Even a softmax rounded to exactly 1 keeps no pseudo-label: through a real model, the
    unlabeled loss's gradient on every parameter is zero."""
    torch.manual_seed(0)
    model = classifier(create_backbone("resnet18", weights=None), ["a", "b", "c"], PREPROCESSING)
    images = torch.randn(4, 3, 28, 28)
    saturated = torch.tensor([[200.0, 0.0, 0.0]]).expand(4, -1)
    assert (saturated.softmax(1).max(1).values == 1.0).all()
    loss, mask, _ = fixmatch_loss(saturated, model(images), threshold=1.0)
    assert loss.item() == 0.0 and not mask.any()
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert fixmatch_loss(saturated, model(images), threshold=0.999).mask.all()


def test_fixmatch_settings_are_checked_naming_the_key() -> None:
    views = {"weak": {"hflip": 0.5}, "strong": {"policy": "randaugment"}}
    good = {"mu": 7, "threshold": 0.95, "weight": 1.0, "start_epoch": 1}
    assert FixMatch.of(**views, **good).strong.policy == "randaugment"
    for key, value, words in [
        ("mu", 0, "semi.mu must be an integer >= 1, got 0"),
        ("threshold", 1.5, "semi.threshold must be a number in [0, 1], got 1.5"),
        ("weight", -1, "semi.weight must be a number >= 0"),
        ("start_epoch", 0.5, "semi.start_epoch must be an integer >= 0"),
    ]:
        with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
            FixMatch.of(**views, **{**good, key: value})
    with pytest.raises(UserError, match=r"unknown semi.weak keys \['flip'\]"):
        FixMatch.of(weak={"flip": 0.5}, strong={}, **good)


# ---------------------------------------------------------------- the stream


def test_the_stream_is_a_function_of_seed_and_step_and_each_pass_covers_the_pool() -> None:
    positions = StreamPositions(size=10, seed=3, batch_size=4)
    steps = [positions.step(step) for step in range(5)]  # 20 positions: two passes
    indices = [index for step in steps for index, _ in step]
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:]) == list(range(10))
    assert indices[:10] != indices[10:]  # each pass its own order
    seeds = [seed for step in steps for _, seed in step]
    assert len(set(seeds)) == 20  # every position its own augmentation
    again = StreamPositions(size=10, seed=3, batch_size=4)
    assert again.step(3) == steps[3]  # no state: a resumed run asks for step 3 and gets it
    assert StreamPositions(size=10, seed=4, batch_size=4).step(0) != steps[0]


def test_unlabeled_images_never_are_labelled_validation_or_test_images(train_config) -> None:
    datamodule = build_datamodule(train_config(*SEMI))
    datamodule.prepare_data()
    datamodule.setup("fit")
    pool = datamodule.unlabeled_set
    labelled = [datamodule.train_set, datamodule.val_set, datamodule.test_set]
    assert len(pool) == 30 and datamodule.counts["data/unlabeled"] == 30
    used = torch.cat([imageset.ids for imageset in labelled])
    assert not torch.isin(pool.ids, used).any()
    assert torch.bincount(pool.labels).tolist() == [3] * 10  # hidden, for train/pseudo_acc only

    loader = datamodule.train_dataloader()
    assert isinstance(loader, SemiLoader)
    loader.sampler.set_epoch(0)
    assert all(isinstance(batch, tuple) and len(batch) == 2 for batch in loader)  # warm-up
    loader.sampler.set_epoch(1)
    batches = list(loader)
    assert all(isinstance(batch, SemiBatch) for batch in batches)
    positions = StreamPositions(len(pool), datamodule.seed, 2 * datamodule.batch_size)
    for number, batch in enumerate(batches):
        rows = [index for index, _ in positions.step(len(batches) + number)]
        assert torch.equal(batch.hidden, pool.labels[rows])  # the views are of pool images
        assert batch.weak.shape == batch.strong.shape == (32, 3, 28, 28)
        assert not torch.equal(batch.weak, batch.strong)


def write_photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i}.png")
        Image.new("L", (28, 28), color=i * 20).save(paths[-1])
    return paths


def test_the_unlabeled_folder_skips_bad_files_and_names_them(
    photo_folder: Path, tmp_path: Path, caplog
) -> None:
    catalogue = tmp_path / "catalogue"
    good = write_photos(catalogue / "new" / "deep", 3)
    (catalogue / "broken.jpg").write_bytes(b"not a jpeg")
    truncated = catalogue / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:40])
    listing = tmp_path / "more.txt"
    listing.write_text("catalogue/new/deep/0.png\ncatalogue/missing.png\n\n")
    with caplog.at_level(logging.WARNING, logger="thaw.data.unlabeled"):
        pool, skipped = read_unlabeled(str(catalogue), str(listing), ["a"], [], None)
    assert sorted(pool.images) == sorted(good) and (pool.labels == -1).all()  # 0.png once
    assert skipped == 3
    (message,) = caplog.messages
    for name in ("broken.jpg", "truncated.png", "missing.png"):
        assert name in message

    # The whole photo folder as the pool: none of its train, val or test photos is kept.
    every = sorted(photo_folder.rglob("*.png"))
    with pytest.raises(UserError, match="no image that decodes, outside the labelled sets"):
        read_unlabeled(str(photo_folder), None, ["a"], every, None)
    with pytest.raises(UserError, match=r"data.unlabeled_root=.*nowhere: no such folder"):
        read_unlabeled(str(tmp_path / "nowhere"), None, ["a"], [], None)


def test_a_folder_run_learns_from_the_catalogue_and_counts_it(
    train_config, photo_folder: Path, tmp_path: Path
) -> None:
    """data.unlabeled_root at the whole shop folder plus new photos: the labelled photos are
    left out of the pool, the bad file is skipped, metrics.json counts both."""
    catalogue = tmp_path / "shop"
    write_photos(catalogue / "new", 5)
    (catalogue / "broken.jpg").write_bytes(b"not a jpeg")
    (catalogue / "labelled").symlink_to(photo_folder)
    cfg = train_config(
        "data=imagefolder",
        f"data.root={photo_folder}",
        "data.image_size=28",
        "semi=fixmatch",
        "semi.mu=1",
        "semi.start_epoch=0",
        "semi.threshold=0.0",
        "finetune=full",
        f"data.unlabeled_root={catalogue}",
        "trainer.max_epochs=1",
        "test=false",
    )
    metrics = run(cfg)
    assert metrics["data/unlabeled"] == 5 and metrics["data/unlabeled_skipped"] == 1
    # Threshold 0 keeps every pseudo-label: the folder's images reached the unlabeled loss.
    assert metrics["train/mask_rate_epoch"] == 1.0 and metrics["train/loss_u_epoch"] > 0
    assert "train/pseudo_acc" not in metrics  # no true labels to compare with


# ---------------------------------------------------------------- runs


def test_a_run_logs_what_the_unlabeled_images_did(train_config, caplog) -> None:
    progress = [
        "++callbacks.progress={_target_:thaw.progress.trainer.LogProgress}",
        "++trainer.enable_progress_bar=true",
    ]
    cfg = train_config(*SEMI, *progress, "semi.threshold=0.0", "trainer.max_epochs=2")
    with caplog.at_level(logging.INFO, logger="thaw.progress"):
        metrics = run(cfg)
    recorded = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert recorded["data/unlabeled"] == 30
    assert metrics["train/mask_rate_epoch"] == 1.0  # threshold 0 keeps every pseudo-label
    (line,) = [m for m in caplog.messages if m.startswith("epoch 2/2 | step 6")]
    assert "train/mask_rate 1.0000" in line  # the progress line shows it
    # The in-memory pool's hidden labels are compared with (the folder run has none).
    assert "train/pseudo_acc" in metrics and metrics["train/loss_u_epoch"] > 0
    trained = load_trained(metrics["checkpoint"])
    consumer = build_datamodule(trained_run_config(trained.config, None), trained.preprocessing)
    consumer.setup()
    assert consumer.unlabeled_set is None  # only training reads the pool
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt")
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("WarmupCheck")]
    assert state["warmup_best"] is not None and state["semi_best"] is not None


def test_fixmatch_trains_in_mixed_precision(train_config) -> None:
    cfg = train_config(*SEMI, "semi.start_epoch=0", "finetune=full", "trainer.max_epochs=1")
    cfg.trainer.precision = "bf16-mixed"
    metrics = run(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_u_epoch"]))
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))


def test_the_warmup_check_warns_only_when_the_unlabeled_epochs_fell_below(caplog) -> None:
    check = WarmupCheck(start_epoch=2)
    with caplog.at_level(logging.WARNING, logger="thaw.semi.callback"):
        check.load_state_dict({"warmup_best": 0.80, "semi_best": 0.85})
        check.on_fit_end(None, None)  # type: ignore[arg-type]
        assert not caplog.messages
        check.load_state_dict({"warmup_best": 0.80, "semi_best": 0.75})
        check.on_fit_end(None, None)  # type: ignore[arg-type]
    (message,) = caplog.messages
    assert "did not help" in message and "0.7500" in message and "0.8000" in message


def test_label_smoothing_that_caps_confidence_below_the_threshold_is_refused(
    train_config,
) -> None:
    """With eps 0.1 and 10 classes the best the model may be is 0.91 sure: no pseudo-label
    would pass 0.95. semi=fixmatch turns smoothing off; setting it back is an error, before
    any step."""
    assert train_config(*SEMI).model.label_smoothing == 0.0
    cfg = train_config(*SEMI, "model.label_smoothing=0.1")
    with pytest.raises(UserError, match=r"label_smoothing=0.1 caps .* at 0.910 with 10 classes"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
    run(train_config(*SEMI, "model.label_smoothing=0.1", "semi.threshold=0.9", "test=false"))


def test_semi_without_unlabeled_images_says_where_they_come_from(train_config) -> None:
    datamodule = build_datamodule(train_config("semi=fixmatch"))
    datamodule.prepare_data()
    with pytest.raises(UserError, match=r"semi=fixmatch needs unlabeled images: data.unlab"):
        datamodule.setup("fit")


def test_unlabeled_images_without_semi_are_named_unused(train_config, caplog) -> None:
    cfg = train_config("data.samples_per_class=4", "data.unlabeled_per_class=3")
    with caplog.at_level(logging.WARNING, logger="thaw.training_checks"):
        check_training_config(cfg)
    assert caplog.messages == ["data.unlabeled_per_class: unused without semi=fixmatch"]


def test_the_unlabeled_loss_leaves_a_frozen_backbone_bitwise_unchanged(train_config) -> None:
    """finetune=linear_probe from a trained checkpoint, with every pseudo-label kept: only the
    head moves."""
    first = train_config(*SEMI, "trainer.max_epochs=2", "test=false", run="source")
    run(first)
    source = Path(first.paths.output_dir) / "checkpoints/best.ckpt"
    cfg = train_config(
        *SEMI,
        "finetune=linear_probe",
        f"model.weights={source}",
        "semi.threshold=0.0",
        "semi.start_epoch=0",
        "trainer.max_epochs=1",
        "test=false",
        run="probe",
    )
    assert run(cfg)["train/mask_rate_epoch"] == 1.0
    before = torch.load(source, weights_only=True)["state_dict"]
    after = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    after = after["state_dict"]
    backbone = [key for key in before if key.startswith("model.backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    head = [key for key in before if key.startswith("model.head.")]
    assert head and not all(torch.equal(before[k], after[k]) for k in head)
