"""The careless values of issue 31, through the real CLI: each ends in one paragraph naming the
value and the fix, with exit status 2, before the work it would spoil.

"Before" is shown, not timed: training points at Fashion-MNIST files that do not exist, so a
check that came after the data was read would answer with the data's error (and its words would
be missing); predict and export name a checkpoint that does not exist, so a check that came
after loading the model would answer with that. All commands share one process
(tests/cli_batch.py), as each would otherwise spend seconds importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, TINY, offline_fmnist, run_cli_batch
from thaw import checks
from thaw.config import compose_config
from thaw.errors import UserError
from thaw.training_checks import (
    OPTIMIZER_FLAGS,
    OPTIMIZER_NUMBERS,
    check_length,
    check_training_config,
)

MAX_STDERR_LINES = 2  # the paragraph, and the line on HYDRA_FULL_ERROR
OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))


@dataclass(frozen=True)
class Case:
    script: str
    args: list[str]
    words: list[str]


def cases(tmp: Path) -> dict[str, Case]:
    """What a careless user typed, and the words the answer must hold."""
    train = [*TINY, "logger=none", *offline_fmnist(tmp / "no_data")]
    missing = f"ckpt_path={tmp / 'missing.ckpt'}"
    predict = [missing, f"inputs={tmp / 'photos'}"]
    table = {
        "lr abc": Case("train", ["optimizer.lr=abc"], ["optimizer.lr", "'abc'", "number >= 0"]),
        "lr negative": Case("train", ["optimizer.lr=-0.1"], ["optimizer.lr", "-0.1", ">= 0"]),
        "weight decay abc": Case(
            "train", ["optimizer.weight_decay=abc"], ["optimizer.weight_decay", "'abc'", ">= 0"]
        ),
        "weight decay negative": Case(
            "train", ["optimizer.weight_decay=-1"], ["optimizer.weight_decay", "-1", ">= 0"]
        ),
        "sgd momentum": Case(
            "train", ["optimizer=sgd", "optimizer.momentum=-0.9"], ["optimizer.momentum", "-0.9"]
        ),
        "nesterov yes": Case(
            "train", ["optimizer=sgd", "optimizer.nesterov=yes"], ["optimizer.nesterov", "'yes'"]
        ),
        "ratio abc": Case(
            "train", ["finetune.backbone_lr_ratio=abc"], ["finetune.backbone_lr_ratio", "'abc'"]
        ),
        "group lr abc": Case(
            "train", ["finetune.group_lrs={stage4:abc}"], ["finetune.group_lrs.stage4", "'abc'"]
        ),
        "smoothing 1": Case(
            "train", ["model.label_smoothing=1"], ["model.label_smoothing", "[0, 1)", "got 1"]
        ),
        "smoothing negative": Case(
            "train", ["model.label_smoothing=-0.1"], ["model.label_smoothing", "[0, 1)", "-0.1"]
        ),
        "max_epochs -1": Case(
            "train", ["trainer.max_epochs=-1"], ["trainer.max_epochs", "got -1", "max_steps"]
        ),
        "max_epochs 1.5": Case(
            "train", ["trainer.max_epochs=1.5"], ["trainer.max_epochs", "got 1.5", "integer"]
        ),
        "max_epochs empty": Case(
            "train", ["trainer.max_epochs="], ["trainer.max_epochs", "got ''", "max_epochs=<n>"]
        ),
        "max_epochs null": Case(
            "train", ["trainer.max_epochs=null"], ["trainer.max_epochs", "got None"]
        ),
        "max_epochs 0": Case(
            "train",
            ["trainer.max_epochs=0"],
            ["trainer.max_epochs=0 trains nothing", "max_epochs=1", "eval.py"],
        ),
        "semi threshold 1.5": Case(
            "train", ["semi=fixmatch", "semi.threshold=1.5"], ["semi.threshold", "1.5", "in [0, 1]"]
        ),
        "semi mu 0": Case("train", ["semi=fixmatch", "semi.mu=0"], ["semi.mu", "got 0", ">= 1"]),
        "semi strong policy": Case(
            "train",
            ["semi=fixmatch", "semi.strong.policy=randaug"],
            ["semi.strong.policy", "'randaug'", "randaugment"],
        ),
        "semi warm-up too long": Case(
            "train",
            ["semi=fixmatch", "semi.start_epoch=2"],
            ["semi.start_epoch=2", "trainer.max_epochs=2", "no unlabeled image is used"],
        ),
        "unlabeled without a limit": Case(
            "train",
            ["data.unlabeled_per_class=100"],
            ["data.unlabeled_per_class=100", "data.samples_per_class"],
        ),
        "predict: out under a file": Case(
            "predict",
            [*predict, f"out={tmp / 'afile' / 'preds.csv'}"],
            [f"out={tmp / 'afile' / 'preds.csv'}", "is a file, not a folder", "out=<"],
        ),
        "predict: out in /proc": Case(
            "predict",
            [*predict, "out=/proc/thaw_predictions.csv"],
            ["out=/proc/thaw_predictions.csv", "cannot be written", "out=<"],
        ),
        "predict: text .onnx": Case(
            "predict",
            [f"model_path={tmp / 'text.onnx'}", f"inputs={tmp / 'photos'}"],
            [str(tmp / "text.onnx"), "Export it again", "export.py"],
        ),
        "export: out under a file": Case(
            "export",
            [missing, f"out={tmp / 'afile' / 'export'}"],
            [f"out={tmp / 'afile' / 'export'}", "is a file, not a folder", "out=<"],
        ),
        "export: out in /proc": Case(
            "export", [missing, "out=/proc/thaw_export"], ["out=/proc/thaw_export", "out=<"]
        ),
    }
    return {
        name: Case(c.script, [*train, *c.args] if c.script == "train" else c.args, c.words)
        for name, c in table.items()
    }


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the cases point at: a regular file, a text file named .onnx, one photo."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "text.onnx").write_text("not an ONNX model\n")
    (root / "photos").mkdir()
    Image.new("RGB", (28, 28)).save(root / "photos" / "a.png")
    return root


def run_dir(tmp: Path, name: str) -> Path:
    return tmp / "runs" / "".join(c if c.isalnum() else "_" for c in name)


@pytest.fixture(scope="module")
def answers(tmp: Path) -> dict[str, dict]:
    """Every case through thaw's CLI, in one process."""
    commands = {
        name: {"script": c.script, "args": [*c.args, f"hydra.run.dir={run_dir(tmp, name)}"]}
        for name, c in cases(tmp).items()
    }
    return run_cli_batch(commands, tmp)


@pytest.mark.parametrize("name", list(cases(Path("/tmp"))))
def test_a_careless_value_is_one_paragraph_and_exit_2_before_any_work(
    name: str, answers: dict[str, dict], tmp: Path
) -> None:
    answer = answers[name]
    stderr = answer["stderr"].strip()
    assert answer["returncode"] == 2, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) <= MAX_STDERR_LINES and lines[0].startswith("Error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    for word in cases(tmp)[name].words:
        assert word in stderr, f"{word!r} missing from: {stderr}"
    written = run_dir(tmp, name)
    assert not (written / "checkpoints").exists()
    assert not list(written.glob("predictions.*")) and not (written / "export.json").exists()


# ---------------------------------------------------------------- the checks, in process
def optimizer_settings(name: str) -> dict:
    """conf/optimizer/<name>.yaml's settings, less Hydra's own keys (_target_, _partial_)."""
    settings = yaml.safe_load((REPO / "conf" / "optimizer" / f"{name}.yaml").read_text())
    return {k: v for k, v in settings.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_setting_of_every_optimizer_config_is_checked(name: str, tmp_path: Path) -> None:
    settings = optimizer_settings(name)
    switches = {k for k, v in settings.items() if isinstance(v, bool)}
    numbers = {k for k, v in settings.items() if isinstance(v, (int, float))} - switches
    assert numbers <= set(OPTIMIZER_NUMBERS), "a new optimizer number needs a check"
    assert switches <= set(OPTIMIZER_FLAGS), "a new optimizer switch needs a check"
    check_training_config(compose_config("train", [f"optimizer={name}"], tmp_path))
    for key in numbers:
        for bad in ("-1", "abc"):
            cfg = compose_config("train", [f"optimizer={name}", f"optimizer.{key}={bad}"], tmp_path)
            with pytest.raises(UserError, match=rf"optimizer\.{key} must be a number >= 0"):
                check_training_config(cfg)
    for key in switches:
        cfg = compose_config("train", [f"optimizer={name}", f"optimizer.{key}=yes"], tmp_path)
        with pytest.raises(UserError, match=rf"optimizer\.{key} must be true"):
            check_training_config(cfg)


@pytest.mark.parametrize(
    "trainer",
    [
        {"max_epochs": 3},
        {"max_epochs": -1, "max_steps": 100},
        {"max_epochs": None, "max_steps": 100},
        {"max_epochs": -1, "max_time": "00:01:00:00"},
    ],
)
def test_a_run_ended_by_epochs_steps_or_time_is_accepted(trainer: dict) -> None:
    check_length(OmegaConf.create(trainer))


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"max_epochs": -1, "max_steps": 0}, r"trainer\.max_steps must be an integer >= 1, or -1"),
        ({"max_epochs": 3, "max_steps": 2.5}, r"trainer\.max_steps .* got 2\.5"),
        ({"max_epochs": True}, r"trainer\.max_epochs must be an integer >= 1, got True"),
        ({"max_epochs": -1.0, "max_steps": 5}, r"trainer\.max_epochs .* got -1\.0"),
    ],
)
def test_a_run_length_that_is_no_count_is_refused(trainer: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_length(OmegaConf.create(trainer))


def test_a_writable_path_passes_and_nothing_is_created(tmp_path: Path) -> None:
    checks.writable("out", tmp_path / "new" / "deeper" / "preds.csv")
    checks.writable("out", tmp_path / "new", folder=True)
    (tmp_path / "old.csv").write_text("kept\n")
    checks.writable("out", tmp_path / "old.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x\n")
    with pytest.raises(UserError, match=r"is a folder: give a file"):
        checks.writable("out", tmp_path)
    with pytest.raises(UserError, match=r"is a file: give a folder"):
        checks.writable("out", tmp_path / "afile", folder=True)
    with pytest.raises(UserError, match=r"afile is a file, not a folder"):
        checks.writable("out", tmp_path / "afile" / "sub" / "model", folder=True)


def test_a_folder_even_root_cannot_write_in_is_refused() -> None:
    with pytest.raises(UserError, match=r"creating a file in /proc fails"):
        checks.writable("out", "/proc/thaw/out", folder=True)
