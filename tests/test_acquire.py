"""acquire.py: each strategy ranks by its own definition, k-center spreads its picks where
uncertainty crowds on near-duplicates, and the queue (CSV, gallery, Label Studio import) holds
predict.py's probabilities, from the command line, without the training stack."""

from __future__ import annotations

import csv
import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FOLDER_CLASSES, run_cli_batch
from test_inference_imports import imported, training_code
from thaw.acquire import acquire, file_outputs
from thaw.config import compose_config
from thaw.errors import UserError
from thaw.models import load_trained
from thaw.predict import predict
from thaw.review.acquisition import STRATEGIES, entropy, kcenter, least_confidence, margin, random

CLASSES = sorted(FOLDER_CLASSES)  # an image folder's classes are its sorted folder names
COLUMNS = ["path", "rank", "score", "label", "prob"]

# Known rows, and each uncertainty score written out from its definition.
ROWS = [
    [0.90, 0.05, 0.05],
    [0.40, 0.35, 0.25],
    [0.50, 0.50, 0.00],
    [0.34, 0.33, 0.33],
    [0.70, 0.20, 0.10],
]
FORMULAS = {
    least_confidence: lambda p: 1 - max(p),
    margin: lambda p: 1 - (sorted(p)[-1] - sorted(p)[-2]),
    entropy: lambda p: -sum(x * math.log(x) for x in p if x > 0),
}

ACQUIRE = """
import json, sys
from thaw.cli import acquire
sys.argv = ["acquire.py", *json.loads(sys.argv[1])]
acquire()
print("MODULES=" + json.dumps(sorted(sys.modules)))
"""


def run_acquire(run_dir: Path, *overrides: str) -> list[dict[str, str]]:
    """acquire.py in process, on the CPU as predict's comparison runs; acquire.csv's rows."""
    path = acquire(compose_config("acquire", ["device=cpu", *overrides], run_dir))
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("strategy", list(FORMULAS), ids=lambda s: s.__name__)
def test_uncertainty_orders_by_its_formula(strategy):
    probabilities = torch.tensor(ROWS)
    expected = [FORMULAS[strategy](row) for row in ROWS]
    ranking = sorted(range(len(ROWS)), key=lambda i: -expected[i])
    order, scores = strategy(probabilities, torch.zeros(len(ROWS), 4), 3, 0)
    assert order.tolist() == ranking[:3]
    assert scores.tolist() == pytest.approx([expected[i] for i in ranking[:3]], abs=1e-6)


def test_random_is_seeded():
    probabilities, features = torch.full((50, 3), 1 / 3), torch.zeros(50, 4)
    first, _ = random(probabilities, features, 20, seed=1)
    assert first.tolist() == random(probabilities, features, 20, seed=1)[0].tolist()
    assert first.tolist() != random(probabilities, features, 20, seed=2)[0].tolist()
    assert len(set(first.tolist())) == 20


def test_kcenter_picks_the_farthest_point_each_time():
    features = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    order, scores = kcenter(torch.full((4, 2), 0.5), features, 4, 0)
    # The mean is 3.25: 10 is farthest from it, 0 from 10, then 2 (2 from 0) before 1.
    assert order.tolist() == [3, 0, 2, 1]
    assert scores.tolist() == pytest.approx([6.75, 10.0, 2.0, 1.0])


def test_kcenter_spreads_over_near_duplicates(folder_run, photo_folder, tmp_path):
    """20 near-copies of the photo the model is least sure of, and 10 others: margin's queue
    fills with the copies (the test can fail), k-center's takes one or two."""
    model = load_trained(folder_run / "checkpoints" / "best.ckpt")
    candidates = sorted((photo_folder / "test").rglob("*.png"))
    _, probabilities, features = file_outputs(model, candidates, 64, "cpu")
    ranked, _ = margin(probabilities, features, len(candidates), 0)
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in ranked[-10:].tolist():  # the photos the model is surest of
        shutil.copy(candidates[i], pool / f"{candidates[i].parent.name}_{candidates[i].name}")
    base = np.asarray(Image.open(candidates[int(ranked[0])]), dtype=np.int16)
    noise = np.random.default_rng(0)
    for i in range(20):
        copy = base + noise.integers(-2, 3, base.shape)
        Image.fromarray(copy.clip(0, 255).astype(np.uint8)).save(pool / f"copy_{i:02d}.png")
    picked = {}
    for strategy in ("kcenter", "margin"):
        rows = run_acquire(
            tmp_path / strategy,
            f"ckpt_path={folder_run / 'checkpoints' / 'best.ckpt'}",
            f"pool={pool}",
            "budget=10",
            f"strategy={strategy}",
        )
        picked[strategy] = sum(Path(row["path"]).name.startswith("copy_") for row in rows)
    assert picked["margin"] >= 5, picked
    assert picked["kcenter"] <= 2, picked


def test_acquire_skips_what_does_not_decode(folder_run, photo_folder, tmp_path, caplog):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, photo in enumerate(sorted((photo_folder / "test").rglob("*.png"))[:3]):
        shutil.copy(photo, pool / f"{i}.png")
    (pool / "broken.png").write_bytes(b"not a png")
    ckpt = f"ckpt_path={folder_run / 'checkpoints' / 'best.ckpt'}"
    rows = run_acquire(tmp_path / "run", ckpt, f"pool={pool}", "budget=100")
    assert sorted(Path(row["path"]).name for row in rows) == ["0.png", "1.png", "2.png"]
    assert any("broken.png" in r.message for r in caplog.records if r.levelname == "WARNING")
    for photo in pool.glob("?.png"):
        photo.unlink()
    with pytest.raises(UserError, match="none of the 1 pool images could be decoded"):
        run_acquire(tmp_path / "none", ckpt, f"pool={pool}")


def test_cli_writes_the_queue(folder_run, photo_folder, tmp_path):
    ckpt = folder_run / "checkpoints" / "best.ckpt"
    pool = photo_folder / "test"
    run_dir = tmp_path / "acquire"
    args = [f"ckpt_path={ckpt}", f"pool={pool}", "budget=5", "device=cpu"]
    modules, output = imported(ACQUIRE, json.dumps([*args, f"hydra.run.dir={run_dir}"]))
    assert training_code(modules) == []  # inference only, like predict and serve
    n_pool = len(list(pool.rglob("*.png")))
    assert f"Queued 5 of {n_pool} pool images by margin; top 5:" in output

    with (run_dir / "acquire.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [int(row["rank"]) for row in rows] == [1, 2, 3, 4, 5]
    assert {row["label"] for row in rows} <= set(CLASSES)
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    predicted = predict(
        compose_config("predict", ["device=cpu", f"ckpt_path={ckpt}", f"inputs={pool}"], tmp_path)
    )
    with predicted.open(newline="") as f:
        by_path = {row["path"]: row for row in csv.DictReader(f)}
    for row in rows:
        assert row["label"] == by_path[row["path"]]["label"]
        assert float(row["prob"]) == pytest.approx(float(by_path[row["path"]]["prob"]), abs=1e-5)

    page = (run_dir / "acquire.html").read_text()
    assert all(Path(row["path"]).name in page for row in rows)

    tasks = json.loads((run_dir / "label_studio.json").read_text())
    interface = ET.parse(run_dir / "label_studio.xml").getroot()
    (image,) = interface.iter("Image")
    (choices,) = interface.iter("Choices")
    assert sorted(c.get("value") for c in choices.iter("Choice")) == CLASSES
    assert len(tasks) == len(rows)
    for row, item in zip(rows, tasks, strict=True):
        assert isinstance(item["data"]["image"], str)
        (result,) = item["predictions"][0]["result"]
        assert result["type"] == "choices"
        assert result["value"]["choices"] == [row["label"]]
        assert result["from_name"] == choices.get("name")
        assert result["to_name"] == image.get("name") == choices.get("toName")


def test_bad_input_exits_2_naming_the_value(folder_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt = f"ckpt_path={folder_run / 'checkpoints' / 'best.ckpt'}"
    cases = {  # the arguments, and what the one paragraph says
        "budget": (["budget=0", f"pool={empty}"], "budget must be an integer >= 1, got 0"),
        "strategy": (
            ["strategy=bogus", f"pool={empty}"],
            f"one of {list(STRATEGIES)}, got 'bogus'",
        ),
        "pool": ([f"pool={empty}"], f"pool='{empty}' matches no image file"),
    }
    commands = {
        name: {
            "script": "acquire",
            "task": "thaw.acquire:task",
            "args": [ckpt, *args, f"hydra.run.dir={tmp_path / name}"],
        }
        for name, (args, _) in cases.items()
    }
    answers = run_cli_batch(commands, tmp_path / "batch")
    for name, (_, said) in cases.items():
        assert answers[name]["returncode"] == 2, answers[name]
        assert said in answers[name]["stderr"], answers[name]["stderr"]
