"""predict and serve run without the training stack: a model is a plain nn.Module loaded from its
checkpoint, so neither imports Lightning, torchmetrics or thaw's training code. Each runs for
real in a fresh interpreter (a prediction written, an upload answered), which then lists what
it imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TRAINING_PACKAGES = ("pytorch_lightning", "lightning_fabric", "lightning", "torchmetrics")
TRAINING_MODULES = (
    "thaw.models.task",
    "thaw.build",
    "thaw.train",
    "thaw.fit_postprocessing",
    "thaw.finetune",
    "thaw.data.datamodule",
)

PREDICT = """
import json, sys
from thaw.cli import predict
sys.argv = ["predict.py", *json.loads(sys.argv[1])]
predict()
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""

SERVE = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from thaw.config import compose_config
from thaw.serve import build_app
overrides, run_dir, image = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with TestClient(build_app(compose_config("serve", overrides, run_dir))) as client:
    answer = client.post("/predict", files={"file": ("photo.png", image.read_bytes())})
print("ANSWER=" + json.dumps(answer.json()))
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""


def imported(program: str, *args: str) -> tuple[list[str], str]:
    """The modules `program` had imported when it ended, and its output."""
    done = subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("MODULES=")]
    return json.loads(line.removeprefix("MODULES=")), done.stdout


def training_code(modules: list[str]) -> list[str]:
    return [
        name
        for name in modules
        if name.split(".")[0] in TRAINING_PACKAGES
        or any(name == m or name.startswith(m + ".") for m in TRAINING_MODULES)
    ]


def test_predict_imports_no_training_code(folder_run: Path, photo_folder: Path, tmp_path) -> None:
    ckpt = folder_run / "checkpoints" / "best.ckpt"
    args = [f"ckpt_path={ckpt}", f"inputs={photo_folder / 'test'}", f"hydra.run.dir={tmp_path}"]
    modules, _ = imported(PREDICT, json.dumps(args))
    assert (tmp_path / "predictions.csv").is_file()
    assert "thaw.models.network" in modules  # it did load the PyTorch model
    assert training_code(modules) == []


def test_serve_imports_no_training_code(folder_run: Path, photo_folder: Path, tmp_path) -> None:
    ckpt = folder_run / "checkpoints" / "best.ckpt"
    image = next((photo_folder / "test").rglob("*.png"))
    overrides = json.dumps([f"ckpt_path={ckpt}", "device=cpu"])
    modules, output = imported(SERVE, overrides, str(tmp_path), str(image))
    (answer,) = [x for x in output.splitlines() if x.startswith("ANSWER=")]
    assert json.loads(answer.removeprefix("ANSWER="))["label"]
    assert "thaw.models.network" in modules
    assert training_code(modules) == []
