"""End to end: composed configs train, write what a run promises, and fail clearly on bad input."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf.errors import InterpolationToMissingValueError
from pytorch_lightning.utilities.model_summary import ModelSummary
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from classifiers import classifier, task
from conftest import PREPROCESSING, REAL_FMNIST, REAL_RECIPE, TINY, offline_fmnist
from data_formats import closed_port_url
from thaw.analysis.evaluation_report import model_size
from thaw.build import build_datamodule, build_strategy, build_trainer
from thaw.checkpoint import CheckpointError
from thaw.config import compose_config, config_dir
from thaw.data import DataUnavailableError
from thaw.data.sources.fashion_mnist import CLASSES, TEST_FILES
from thaw.evaluate import evaluate
from thaw.models import WeightsError, create_backbone, load_trained
from thaw.models.backbones import IMAGENET_MEAN
from thaw.train import optimized_value, run

ROOT = Path(__file__).resolve().parents[1]
# Every config group of thaw (hydra/ holds Hydra's own settings).
GROUPS = sorted(p.name for p in config_dir().iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes_and_instantiates(train_config, group, option):
    extra = ["model.weights=null"] if group in ("experiment", "hparams_search") else []
    if option == "imagefolder" and group != "data":
        extra.append("data=imagefolder")  # as the preset chooses it, without the generated data
    cfg = train_config(f"{group}={option}", *extra)
    if cfg.data.source._target_.endswith(("ImageFolder", "StreamingSource")):
        cfg.data.root = str(ROOT)  # any existing directory: instantiating reads nothing yet
    if cfg.data.source._target_.endswith("CsvSource"):
        cfg.data.csv = "labels.csv"  # any path, as instantiating reads nothing yet
    datamodule = build_datamodule(cfg)
    assert datamodule.batch_size == cfg.data.batch_size
    backbone = create_backbone(cfg.model.name, None, cfg.model.family, input_size=32)
    with torch.no_grad():
        features = backbone.model.eval()(torch.zeros(1, 3, 32, 32))
    assert features.shape == (1, backbone.feature_dim)
    assert callable(instantiate(cfg.optimizer)) and callable(instantiate(cfg.scheduler))
    build_strategy(cfg).check_schedule(cfg.trainer.max_epochs, list(backbone.groups))  # thaws
    assert build_trainer(cfg, []).max_epochs == cfg.trainer.max_epochs


def logged_tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return (
        set(events.Tags()["scalars"])
        | {f"image:{t}" for t in events.Tags()["images"]}
        | {f"hparams:{t}" for t in events.PluginTagToContent("hparams")}
    )


@pytest.mark.parametrize(
    "averaging", [[], ["callbacks=ema", "callbacks.ema.decay=0.5"]], ids=["plain", "ema"]
)
def test_run_writes_checkpoints_events_metrics_and_eval_reproduces_them(
    train_config, tmp_path, fmnist_root, averaging
):
    """With callbacks=ema the run's test must score the checkpoint's averaged weights, which eval,
    export and serving load, not the raw ones."""
    cfg = train_config("finetune.freeze_epochs=1", "data.normalize=dataset", *averaging)
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)

    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    tags = logged_tags(run_dir)
    expected = {
        "train/loss_epoch",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "test/acc",
        "test/acc_top5",
        "test/f1_macro",
        "image:test/confusion_matrix",
        "hparams:_hparams_/experiment",
        "hparams:_hparams_/session_start_info",
    }
    expected |= {f"lr/{g}" for g in ("stage1", "stage2", "stage3", "stage4", "head")}
    assert expected <= tags, expected - tags

    written = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/acc_top5", "test/f1_macro"):
        assert written[key] == pytest.approx(metrics[key])
    assert set(written["test/per_class_acc"]) == set(CLASSES)
    confusion = torch.tensor(written["test/confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 40
    assert written["test/acc"] == pytest.approx((confusion.diag().sum() / 40).item())

    # The checkpoint alone evaluates: its dataset statistics travel in it, and only the test
    # images need to exist.
    trained = load_trained(run_dir / "checkpoints" / "best.ckpt")
    assert trained.classes == list(CLASSES) and not trained.training
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    # The training split's statistics, the temperature fitted after training (calibrate) and
    # the rejection rule fitted after it.
    assert trained.preprocessing == datamodule.preprocessing
    assert trained.postprocessing.temperature == metrics["temperature"]
    rule = trained.postprocessing.rejection
    assert (rule.score, rule.keep, rule.threshold) == (
        "mahalanobis",
        0.95,
        metrics["reject/threshold"],
    )
    assert trained.preprocessing.grayscale and trained.preprocessing.mean != IMAGENET_MEAN
    test_only = tmp_path / "test_images_only"
    test_only.mkdir()
    for stem in TEST_FILES:
        shutil.copy(fmnist_root / f"{stem}.gz", test_only)
    eval_cfg = compose_config(
        "eval",
        [
            f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
            f"data_root={test_only}",
            "trainer.accelerator=cpu",
            "+trainer.enable_progress_bar=false",
        ],
        tmp_path / "eval",
    )
    recomputed = evaluate(eval_cfg)
    for key in ("test/acc", "test/acc_top5", "test/f1_macro", "test/loss"):
        assert recomputed[key] == pytest.approx(written[key], abs=1e-6)
    assert recomputed["test/confusion_matrix"] == written["test/confusion_matrix"]
    # Eval writes the report too, with the training run's wall time read from its metrics.json.
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["confusion_matrix"] == written["test/confusion_matrix"]
    assert report["summary"]["wall_time"] == f"{written['train/wall_time_s']:.0f} s"
    assert (tmp_path / "eval" / "report.html").is_file()


def test_resume_from_last_finishes_the_run(train_config):
    cfg = train_config("finetune=full", "trainer.max_epochs=1", "test=false")
    run(cfg)
    resumed = train_config("finetune=full", "trainer.max_epochs=2", "test=false", "ckpt_path=last")
    last_path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last_path, weights_only=True)["global_step"] == 5  # 72 images, 16 a batch
    run(resumed)
    assert torch.load(last_path, weights_only=True)["global_step"] == 2 * 5


def test_a_thaw_checkpoint_is_usable_as_backbone_weights(train_config):
    cfg = train_config(
        "finetune=full", "trainer.max_epochs=1", "test=false", "data.classes=[Bag,Sandal]"
    )
    run(cfg)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    saved = torch.load(best, weights_only=True)
    assert saved["thaw"]["classes"] == ["Bag", "Sandal"]
    backbone = create_backbone("resnet18", str(best))
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][f"model.backbone.{key}"]), key
    # Ten classes on a two-class backbone: a linear probe trains the new head only, so the
    # transferred backbone is still the checkpoint's, bit for bit.
    transfer = train_config(
        "finetune=linear_probe", "trainer.max_epochs=1", f"model.weights={best}", run="transfer"
    )
    assert "test/acc" in run(transfer)
    tuned = torch.load(Path(transfer.paths.output_dir) / "checkpoints" / "last.ckpt")
    transferred = [k for k in saved["state_dict"] if k.startswith("model.backbone.")]
    assert len(transferred) == len(backbone.model.state_dict())
    for key in transferred:
        assert torch.equal(tuned["state_dict"][key], saved["state_dict"][key]), key
    with pytest.raises(WeightsError, match="checkpoint of model.name=resnet18.*resnet34"):
        create_backbone("resnet34", str(best))


def test_a_checkpoint_that_cannot_continue_this_run_says_why(train_config, tmp_path):
    cfg = train_config(
        "finetune=full", "trainer.max_epochs=1", "test=false", "data.classes=[Bag,Sandal]"
    )
    run(cfg)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    with pytest.raises(CheckpointError, match=r"trained on 2 classes \['Bag', 'Sandal'\].* 3:"):
        run(train_config(f"ckpt_path={best}", "data.classes=[Bag,Sandal,Shirt]", run="b"))
    with pytest.raises(CheckpointError, match="model.name=resnet18.*model.name=resnet34"):
        run(
            train_config(
                f"ckpt_path={best}", "data.classes=[Bag,Sandal]", "model.name=resnet34", run="c"
            )
        )
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(best.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="broken.ckpt.*truncated"):
        run(train_config(f"ckpt_path={broken}", "data.classes=[Bag,Sandal]", run="d"))


def test_learns_real_fashion_mnist(train_config, tmp_path):
    assert REAL_FMNIST.is_dir(), "install the data: apt-get install dataset-fashion-mnist"
    cfg = train_config(
        f"data.root={tmp_path / 'empty'}",
        "data.source.download=false",
        f"data.source.system_dir={REAL_FMNIST}",
        "data.samples_per_class=150",
        *REAL_RECIPE,
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=2",
    )
    metrics = run(cfg)
    # 1,500 training images from random init, 3 epochs, validated on 500: seeds 42 and 1 gave
    # 0.817 and 0.810 on these 1,000 test images; chance is 0.10.
    assert metrics["test/acc"] > 0.75, metrics


def test_a_kfold_multirun_writes_a_run_dir_per_fold_and_reports_mean_and_std(fmnist_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *TINY,
        *offline_fmnist(fmnist_root),
        "finetune=full",
        "trainer.max_epochs=1",
        "data.folds=2",
        "data.fold=0,1",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert [p.name for p in runs] == ["0", "1"]
    folds = [(p / ".hydra" / "overrides.yaml").read_text() for p in runs]
    assert all(f"data.fold={k}" in folds[k] for k in range(2))

    metrics = [json.loads((p / "metrics.json").read_text()) for p in runs]
    with (sweep_dir / "sweep.csv").open() as file:
        rows = {row["job"]: row for row in csv.DictReader(file)}
    for job, values in zip(runs, metrics, strict=True):
        assert float(rows[job.name]["test/acc"]) == values["test/acc"]
        assert float(rows[job.name]["val/acc_best"]) == values["val/acc_best"]
    report = (sweep_dir / "sweep.md").read_text()
    test_acc = [m["test/acc"] for m in metrics]
    mean, std = statistics.fmean(test_acc), statistics.stdev(test_acc)
    assert f"| test/acc | {mean:.4f} | {std:.4f} |" in report and "(2 folds)" in report
    assert "Sweep " in result.stderr + result.stdout  # the top rows on the console


def test_the_console_script_help_lists_the_config_groups():
    script = Path(sys.executable).parent / "thaw-train"  # the same app as python train.py
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    for group in GROUPS:
        assert f"{group}:" in result.stdout, group


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_group_option_lists_the_valid_ones(train_config):
    with pytest.raises(ConfigCompositionException, match="(?s)model/nope.*resnet18"):
        train_config("model=nope")


def test_unknown_backbone_name_lists_the_valid_ones(train_config):
    cfg = train_config("model.name=resnet9000")
    with pytest.raises(ValueError, match=r"resnet9000.*\['efficientnet_b0'"):
        run(cfg)


def test_unknown_class_lists_the_valid_names(train_config):
    with pytest.raises(ValueError, match="(?s)Shoe.*Ankle boot"):
        run(train_config("data.classes=[Shoe,Bag]"))


def test_missing_dataset_names_url_file_and_place(train_config, tmp_path):
    cfg = train_config(f"data.root={tmp_path / 'nothing'}")
    with pytest.raises(DataUnavailableError) as err:
        run(cfg)
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "nothing") in message
    assert "http" in message and "dataset-fashion-mnist" in message


def test_experiment_without_source_weights_says_which_value_is_missing(fmnist_root, tmp_path):
    tiny = [o for o in TINY if not o.startswith("model.weights")]
    cfg = compose_config(
        "train",
        [*tiny, "experiment=fmnist_transfer", *offline_fmnist(fmnist_root)],
        tmp_path / "run",
    )
    with pytest.raises(InterpolationToMissingValueError, match="source_checkpoint"):
        run(cfg)


def test_undownloadable_weights_name_weights_cache_and_fixes(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    real = torchvision.models._api.load_state_dict_from_url
    url = (
        closed_port_url() + "resnet18-f37072fd.pth"
    )  # the real download code, aimed at a port where nothing listens
    monkeypatch.setattr(
        torchvision.models._api,
        "load_state_dict_from_url",
        lambda _url, *a, **k: real(url, *a, **k),
    )
    with pytest.raises(WeightsError) as err:
        create_backbone("resnet18", "IMAGENET1K_V1")
    message = str(err.value)
    assert "IMAGENET1K_V1" in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "model.weights=" in message and "null" in message


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert create_backbone("resnet18", str(path)).feature_dim == 512  # its own kind fits
    with pytest.raises(WeightsError, match=r"do not fit backbone resnet50.*layer1\.0\.conv3"):
        create_backbone("resnet50", str(path))
    with pytest.raises(WeightsError, match="IMAGENET9"):
        create_backbone("resnet18", "IMAGENET9")
    with pytest.raises(WeightsError, match="no such file"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken.ckpt.*truncated"):
        create_backbone("resnet18", str(path))


def test_a_failing_run_leaves_written_checkpoints_alone(train_config):
    cfg = train_config("finetune=full", "trainer.max_epochs=1", "test=false")
    run(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    with pytest.raises(Exception, match="finetune.bn='sideways'"):
        run(train_config("finetune=full", "trainer.max_epochs=1", "finetune.bn=sideways"))
    with pytest.raises(Exception, match="(?i)precision 17 is invalid. allowed"):
        run(train_config("finetune=full", "trainer.max_epochs=1", "trainer.precision=17"))
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before


def test_load_trained_refuses_files_it_cannot_use(train_config, tmp_path):
    foreign = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), foreign)
    with pytest.raises(CheckpointError, match="resnet18.pth is not a thaw checkpoint"):
        load_trained(foreign)
    cfg = train_config(
        "finetune=full", "trainer.max_epochs=1", "test=false", "data.classes=[Bag,Sandal]"
    )
    run(cfg)
    old = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt", weights_only=True)
    del old["thaw"]["preprocessing"]  # as written before the preprocessing was saved
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="old.ckpt was written before.*preprocessing"):
        load_trained(tmp_path / "old.ckpt")


def test_optimized_metric_must_be_a_logged_metric():
    logged = {"val/acc": 0.5, "val/acc_best": 0.75, "checkpoint": "best.ckpt"}
    assert optimized_value(logged, "val/acc_best") == 0.75
    assert optimized_value(logged, None) is None
    with pytest.raises(ValueError, match=r"'val/accuracy'.*\['val/acc', 'val/acc_best'\]"):
        optimized_value(logged, "val/accuracy")


def test_mlflow_logger_records_params_metrics_per_step_and_the_best_checkpoint(
    train_config, tmp_path
):
    cfg = train_config("logger=mlflow", "trainer.log_every_n_steps=1")
    metrics = run(cfg)
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.log_dir) / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == cfg.paths.output_dir
    assert float(found.data.params["optimizer/lr"]) == cfg.optimizer.lr
    assert found.data.params["model/name"] == "resnet18"
    steps = [m.step for m in client.get_metric_history(found.info.run_id, "train/loss_step")]
    assert steps == list(range(2 * 5))  # 2 epochs of 5 steps, each logged
    assert found.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert found.data.metrics["temperature"] == pytest.approx(metrics["temperature"])
    (artifact,) = client.list_artifacts(found.info.run_id, "checkpoints")
    copy = client.download_artifacts(found.info.run_id, artifact.path, str(tmp_path))
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    assert Path(copy).read_bytes() == best.read_bytes()  # the calibrated, tested checkpoint


def test_debug_fast_runs_end_to_end_and_writes_no_checkpoint(train_config):
    cfg = train_config("debug=fast")
    assert "test/loss" in run(cfg)  # trained, then tested on the weights as they ended
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))  # not even Lightning's default


def test_the_model_summary_counts_the_flops_of_one_image():
    model = classifier(create_backbone("resnet18", None), ["a", "b"], PREPROCESSING).eval()
    summary = ModelSummary(task(model))
    assert summary.total_flops == model_size(model, PREPROCESSING.input_size)["flops_per_image"] > 0
