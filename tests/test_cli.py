"""The command line as a user (or a cluster log) meets it: each mistake of the table in issue 20
runs the real CLI in a subprocess and must end in a short paragraph naming the value and the fix,
with exit status 2, while a bug keeps its traceback (exit 1); a redirected run shows its epochs
as they happen; SIGTERM ends a run with 143.

The mistakes run once, two at a time (each process spends seconds importing torch), in a module
fixture; each has its own test that reads its result."""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import REPO, TINY, offline_fmnist, run_cli, run_cli_batch
from data_formats import closed_port_url, write_image_folder, write_truncated_jpeg
from thaw import cli
from thaw.cli import describe, is_user_error
from thaw.config import SILENT, compose_config
from thaw.errors import UserError
from thaw.finetune import TwoPhase
from thaw.finetune.param_groups import build_param_groups
from thaw.models.layer_groups import LayerGroup
from thaw.progress import track
from thaw.train import run

# The tiny settings of the in-process tests, minus what only silences them.
# (A tiny epoch has fewer steps than the default logging interval, which Lightning warns of.)
CLI_TINY = [*(o for o in TINY if o not in SILENT), "trainer.log_every_n_steps=1"]
MAX_STDERR_LINES = 3  # the paragraph, and the line on HYDRA_FULL_ERROR


@dataclass(frozen=True)
class Mistake:
    """A command line with one mistake, and the words its message must hold."""

    script: str
    args: list[str]
    words: list[str]
    env: dict[str, str] = field(default_factory=dict)
    task: str | None = None  # "module:function" run in place of the script's own task


@pytest.fixture(scope="module")
def files(
    tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path, folder_run: Path
) -> dict[str, Path]:
    """The files the mistakes point at: a Fashion-MNIST checkpoint (trained here, tiny), files
    that are no checkpoint, an empty dir, and image folders (one with a corrupt JPEG, one with
    other classes)."""
    root = tmp_path_factory.mktemp("cli")
    overrides = [
        *TINY,
        *offline_fmnist(fmnist_root),
        "finetune=full",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "test=false",
        "calibrate=false",
        "logger=none",
    ]
    run(compose_config("train", overrides, root / "fmnist_run"))
    torch.save(torch.zeros(3), root / "tensor.pt")
    (root / "text.ckpt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, root / "foreign.ckpt")
    (root / "empty").mkdir()
    corrupt = write_image_folder(root / "corrupt", ["a", "b"], 6, splits=("",), size=(28, 28))
    write_truncated_jpeg(corrupt / "a" / "broken.jpg", size=(28, 28))
    write_image_folder(root / "other", ["x", "y"], 2, splits=("test",), size=(28, 28))
    (root / "labels.csv").write_text("path,label\na/img_0.png,a\na/img_1.png,\n")
    return {
        "ckpt": root / "fmnist_run" / "checkpoints" / "last.ckpt",
        "folder_ckpt": folder_run / "checkpoints" / "best.ckpt",
        "tensor": root / "tensor.pt",
        "text": root / "text.ckpt",
        "foreign": root / "foreign.ckpt",
        "empty": root / "empty",
        "corrupt": corrupt,
        "corrupt_file": corrupt / "a" / "broken.jpg",
        "other": root / "other",
        "csv": root / "labels.csv",
        "runs": root / "runs",
    }


def mistakes(f: dict[str, Path], fmnist_root: Path) -> dict[str, Mistake]:
    """The table: what a new user typed, and the words the answer must hold."""
    train = [*CLI_TINY, *offline_fmnist(fmnist_root)]
    return {
        "unknown key": Mistake(
            "train",
            ["trainer.max_epoch=1"],
            ["trainer.max_epoch", "Did you mean trainer.max_epochs"],
        ),
        "unknown option": Mistake("train", ["model=resnet19"], ["Did you mean model=resnet18"]),
        "override syntax": Mistake(
            "train", ["trainer.max_epochs=1,"], ["trainer.max_epochs=1,", "override_grammar"]
        ),
        "missing data.root": Mistake("train", ["data=imagefolder"], ["data.root", "data.root="]),
        "never thaws": Mistake(
            "train",
            [*train, "finetune.freeze_epochs=5", "trainer.max_epochs=1"],
            ["finetune.freeze_epochs=5", "trainer.max_epochs=1", "finetune=linear_probe"],
        ),
        "16-bit on CPU": Mistake(
            "train", [*train, "trainer.precision=16-mixed"], ["16-mixed", "bf16-mixed", "32"]
        ),
        "offline weights": Mistake(
            "train",
            [*[o for o in train if not o.startswith("model.weights")]],
            ["IMAGENET1K_V1", "model.weights=", "null", str(f["runs"] / "torch")],
            env={
                "TORCH_HOME": str(f["runs"] / "torch"),
                "http_proxy": closed_port_url(),
                "https_proxy": closed_port_url(),
                "no_proxy": "",
            },
        ),
        "tensor as ckpt_path": Mistake(
            "train", [*train, f"ckpt_path={f['tensor']}"], [str(f["tensor"]), "Tensor"]
        ),
        "tensor as weights": Mistake(
            "train", [*train, f"model.weights={f['tensor']}"], [str(f["tensor"]), "Tensor"]
        ),
        "ckpt_path=last, new dir": Mistake(
            "train", [*train, "ckpt_path=last"], ["ckpt_path=last", "hydra.run.dir="]
        ),
        "missing data.csv": Mistake("train", [*CLI_TINY, "data=csv"], ["data.csv", "data.csv="]),
        "bad CSV row": Mistake(
            "train",
            [*CLI_TINY, "data=csv", f"data.csv={f['csv']}"],
            [str(f["csv"]), "line 3: a/img_1.png has an empty label"],
        ),
        "corrupt image at setup": Mistake(
            "train",
            [
                *[o for o in CLI_TINY if not o.startswith("data.num_workers")],
                "data=imagefolder",
                f"data.root={f['corrupt']}",
                "data.image_size=28",
                "data.val_fraction=0.2",
                "data.loader=dataloader",
                "data.num_workers=2",
            ],
            ["could not decode image", str(f["corrupt_file"]), "Replace or remove"],
        ),
        "eval: tensor": Mistake("eval", [f"ckpt_path={f['tensor']}"], [str(f["tensor"]), "Tensor"]),
        "eval: text file": Mistake(
            "eval", [f"ckpt_path={f['text']}"], [str(f["text"]), "not a torch checkpoint"]
        ),
        "eval: not thaw's": Mistake(
            "eval", [f"ckpt_path={f['foreign']}"], [str(f["foreign"]), "not a thaw checkpoint"]
        ),
        "eval: empty data_root": Mistake(
            "eval",
            [f"ckpt_path={f['ckpt']}", f"data_root={f['empty']}"],
            ["Fashion-MNIST is missing from " + str(f["empty"])],
        ),
        "a bug": Mistake(  # not a mistake of the user's: see test_a_bug_keeps_its_traceback
            "train", [*train, "model.head_dropout=2"], ["dropout probability"]
        ),
        "a user error in a task": Mistake(
            "train", [], ["seed=42 is refused", "seed=<another>"], task="cli_batch:refusing_task"
        ),
        "a failed operation in a task": Mistake(  # a bug too
            "train", [], ["invalid literal for int()", "'x'"], task="cli_batch:failing_task"
        ),
        "predict: tensor": Mistake(
            "predict",
            [f"ckpt_path={f['tensor']}", f"inputs={f['corrupt']}"],
            [str(f["tensor"]), "Tensor"],
        ),
        "export: text file": Mistake(
            "export", [f"ckpt_path={f['text']}"], [str(f["text"]), "not a torch checkpoint"]
        ),
        "eval: other classes": Mistake(
            "eval",
            [f"ckpt_path={f['folder_ckpt']}", f"data_root={f['other']}"],
            ["trained on classes", "['x', 'y']", "data_root"],
        ),
    }


# Mistakes answered before the task's module is imported, or that need their own environment:
# one process each. The others share one process (tests/cli_batch.py), as each would spend
# seconds importing torch.
OWN_PROCESS = {"unknown key", "unknown option", "override syntax", "missing data.root"}


@pytest.fixture(scope="module")
def answers(files: dict[str, Path], fmnist_root: Path) -> dict[str, SimpleNamespace]:
    """Every mistake of the table, run through the CLI in subprocesses, two at a time."""
    table = mistakes(files, fmnist_root)

    def run_dir(name: str) -> Path:
        return files["runs"] / "".join(c if c.isalnum() else "_" for c in name)

    def alone(name: str) -> dict[str, SimpleNamespace]:
        mistake = table[name]
        answer = run_cli(mistake.script, mistake.args, run_dir(name), mistake.env)
        return {name: SimpleNamespace(returncode=answer.returncode, stderr=answer.stderr)}

    def shared(names: list[str]) -> dict[str, SimpleNamespace]:
        commands = {
            n: {
                "script": table[n].script,
                "args": [*table[n].args, f"hydra.run.dir={run_dir(n)}"],
                "task": table[n].task,
            }
            for n in names
        }
        answers = run_cli_batch(commands, files["runs"])
        return {n: SimpleNamespace(**a) for n, a in answers.items()}

    own = [n for n in table if n in OWN_PROCESS or table[n].env]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the shared process beside the others
        together = pool.submit(shared, [n for n in table if n not in own])
        found: dict[str, SimpleNamespace] = {}
        for part in pool.map(alone, own):
            found.update(part)
        found.update(together.result())
    return found


@pytest.mark.parametrize(
    "name",
    [
        "unknown key",
        "unknown option",
        "override syntax",
        "missing data.root",
        "missing data.csv",
        "bad CSV row",
        "never thaws",
        "16-bit on CPU",
        "offline weights",
        "tensor as ckpt_path",
        "tensor as weights",
        "ckpt_path=last, new dir",
        "corrupt image at setup",
        "eval: tensor",
        "eval: text file",
        "eval: not thaw's",
        "eval: empty data_root",
        "eval: other classes",
        "predict: tensor",
        "export: text file",
        "a user error in a task",
    ],
)
def test_a_mistake_is_one_paragraph_with_the_value_and_the_fix_and_exit_2(
    name: str, answers: dict[str, subprocess.CompletedProcess], files, fmnist_root
) -> None:
    answer = answers[name]
    stderr = answer.stderr.strip()
    assert answer.returncode == 2, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) <= MAX_STDERR_LINES and lines[0].startswith("Error: "), stderr[-3000:]
    for word in mistakes(files, fmnist_root)[name].words:
        assert word in stderr, f"{word!r} missing from: {stderr}"


@pytest.mark.parametrize(
    "name",
    [
        # nn.Dropout, not thaw, refuses p=2: an error thaw did not check is not dressed up.
        "a bug",
        # int("x") in a task: a plain ValueError from an operation, not a UserError.
        "a failed operation in a task",
    ],
)
def test_a_bug_keeps_its_traceback_and_exit_1(
    name: str, answers: dict[str, SimpleNamespace], files, fmnist_root
) -> None:
    answer = answers[name]
    assert answer.returncode == 1, answer.stderr[-3000:]
    assert "Traceback" in answer.stderr, answer.stderr[-3000:]
    for word in mistakes(files, fmnist_root)[name].words:
        assert word in answer.stderr, f"{word!r} missing from: {answer.stderr[-3000:]}"


def test_an_instantiation_error_is_the_users_only_when_its_cause_is() -> None:
    param = torch.zeros(1, requires_grad=True)
    with pytest.raises(InstantiationException) as bad_value:  # torch's own check of lr
        instantiate({"_target_": "torch.optim.SGD", "params": [param], "lr": -1.0})
    with pytest.raises(InstantiationException) as unbound:  # a keyword SGD does not take
        instantiate({"_target_": "torch.optim.SGD", "params": [param], "lrr": 0.1})
    with pytest.raises(InstantiationException) as checked:  # thaw's UserError, with its key
        instantiate({"_target_": "thaw.finetune.TwoPhase", "freeze_epochs": -1}, _recursive_=False)
    with pytest.raises(InstantiationException) as bug:
        instantiate({"_target_": "builtins.getattr", "_args_": [object(), "missing"]})
    with pytest.raises(InstantiationException) as runtime_error:  # not an argument refusal
        instantiate({"_target_": "torch.zeros", "_args_": [-1]})
    assert is_user_error(bad_value.value) and "Invalid learning rate" in describe(bad_value.value)
    assert is_user_error(unbound.value) and "lrr" in describe(unbound.value)
    assert is_user_error(checked.value) and "finetune.freeze_epochs=-1" in describe(checked.value)
    assert not is_user_error(bug.value)
    assert not is_user_error(runtime_error.value)


def test_a_check_of_thaw_is_a_user_error_and_a_failed_operation_in_thaw_a_bug() -> None:
    one_block = LayerGroup(blocks=[{}], no_decay=frozenset(), modules=[])
    with pytest.raises(ValueError) as failed:  # zip(strict=True) inside thaw: a bug
        build_param_groups({"stage1": one_block}, {"stage1": [0.1, 0.2]}, 0.0)
    with pytest.raises(UserError) as checked:  # thaw's check of a value
        TwoPhase(freeze_epochs=-1)
    with pytest.raises(ValueError) as operation:
        int("x")
    assert not is_user_error(failed.value)
    assert not is_user_error(operation.value)
    assert not is_user_error(ValueError("a plain ValueError raised on purpose is still a bug"))
    assert not is_user_error(KeyError("missing"))
    assert is_user_error(checked.value) and "finetune.freeze_epochs=-1" in describe(checked.value)


# The exception classes thaw defines for bad input: each is a UserError (a user error by its type).
INPUT_ERRORS = [
    ("thaw.data.images", "ImageDecodeError"),
    ("thaw.data.sources.download", "DataUnavailableError"),
    ("thaw.data.sources.download", "ChecksumError"),
    ("thaw.inference.export_formats", "ExportError"),
    ("thaw.inference.parity", "ParityError"),
    ("thaw.checkpoint", "CheckpointError"),
    ("thaw.models.backbones.registry", "WeightsError"),
    ("thaw.checkpoint_io", "CheckpointSaveError"),
    ("thaw.run_dir", "RunDirInUseError"),
]
# Those that never reach the command line as errors: the server answers them over HTTP (4xx,
# 503), and a training stopped by a signal exits 128 + its number.
NOT_INPUT_ERRORS = {
    "UploadError",
    "ProtocolError",
    "Overloaded",
    "BudgetExhausted",
    "TrainingStopped",
}


@pytest.mark.parametrize(("module", "name"), INPUT_ERRORS)
def test_each_exception_class_thaw_defines_for_bad_input_is_a_user_error(
    module: str, name: str
) -> None:
    error = getattr(importlib.import_module(module), name)
    assert issubclass(error, UserError), f"{module}.{name} bases {error.__bases__}"
    assert is_user_error(error("a message"))


def test_every_exception_class_of_thaw_is_listed_as_for_bad_input_or_not() -> None:
    """A new exception class is a user error (subclass UserError, list it in INPUT_ERRORS) or
    is kept from the command line (NOT_INPUT_ERRORS): the CLI tells them apart by type alone."""
    listed = {name for _, name in INPUT_ERRORS}
    defined = {
        found.group(1)
        for source in (REPO / "src" / "thaw").rglob("*.py")
        for found in re.finditer(
            r"^class (\w+)\(([^)]*(?:Error|Exception)[^)]*)\):",
            source.read_text(),
            re.MULTILINE,
        )
    }
    assert defined - {"UserError"} <= listed | NOT_INPUT_ERRORS, defined - listed


def test_the_cli_tells_user_errors_by_type_not_by_reading_source_lines() -> None:
    source = Path(cli.__file__).read_text()
    assert "linecache" not in source
    for inspection in ("import inspect", "tb_frame", "f_globals", "tb_lineno", "_getframe"):
        assert inspection not in source, inspection


def test_hydra_full_error_shows_the_traceback_of_a_mistake(tmp_path) -> None:
    answer = run_cli("train", ["trainer.max_epoch=1"], tmp_path / "run", {"HYDRA_FULL_ERROR": "1"})
    assert answer.returncode == 1
    assert "Traceback" in answer.stderr and "max_epoch" in answer.stderr


def wait_for(process: subprocess.Popen, log: Path, text: str, seconds: float = 240) -> bool:
    """Whether `text` appeared in `log` while `process` still ran."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in (log.read_text() if log.exists() else ""):
            return process.poll() is None
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def start_train(args: list[str], run_dir: Path, log: Path) -> subprocess.Popen:
    """A training run with stdout and stderr redirected to `log`, as a cluster job has it."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )


def epoch_lines(log: Path) -> list[str]:
    return [
        line
        for line in log.read_text().splitlines()
        if "[thaw.progress]" in line and " | step " in line
    ]


def test_a_redirected_run_logs_each_epoch_as_it_ends(tmp_path, fmnist_root) -> None:
    log = tmp_path / "run.log"
    args = [
        *CLI_TINY,
        *offline_fmnist(fmnist_root),
        "trainer.max_epochs=3",
        "callbacks.progress.every_n_steps=2",
        "calibrate=false",
    ]
    process = start_train(args, tmp_path / "run", log)
    try:
        assert wait_for(process, log, "epoch 1/3 | step"), log.read_text()[-3000:]
        assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        process.kill()
    lines = epoch_lines(log)
    assert [line.split(" - ")[1].split(" |")[0] for line in lines] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    # The first epoch trains the head alone (two_phase), the next ones the backbone too.
    assert "trains head |" in lines[0] and "trains head, stage4, stage3" in lines[1]
    for line in lines:
        assert all(key in line for key in ("train/loss", "val/loss", "val/acc", "img/s", "ETA"))
    assert "lr head" in lines[0] and "stage1" in lines[1]  # the lowest thawed group's rate
    steps = [line for line in log.read_text().splitlines() if "step 2/" in line]
    assert steps, "no line within the epochs (every_n_steps=2)"
    assert "Phases (3 epochs): epoch 1: head; epochs 2-3: head, stage4" in log.read_text()
    assert "test: 40 images in" in log.read_text()  # the test run (and eval) log theirs
    assert "Tip:" not in log.read_text() and "LeafSpec" not in log.read_text()


def test_track_logs_a_line_every_tenth_and_at_the_end_when_not_on_a_terminal(
    caplog, monkeypatch
) -> None:
    monkeypatch.setattr("thaw.progress.on_terminal", lambda: False)  # also under pytest -s
    with caplog.at_level(logging.INFO, logger="thaw.progress"):
        assert list(track(range(25), "Predicting", total=25)) == list(range(25))
    done = [m.split(" (")[0] for m in caplog.messages]
    assert done == [f"Predicting: {n}/25" for n in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25)]


def test_sigterm_ends_the_run_with_143_and_a_checkpoint_to_resume(tmp_path, fmnist_root) -> None:
    log = tmp_path / "run.log"
    args = [*CLI_TINY, *offline_fmnist(fmnist_root), "trainer.max_epochs=50"]
    process = start_train(args, tmp_path / "run", log)
    try:
        assert wait_for(process, log, "epoch 1/50 | step"), log.read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        process.kill()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
