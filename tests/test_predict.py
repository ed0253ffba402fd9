"""predict.py on real photos: the same accuracy as eval.py, TTA and ensembles, bad files and bad
input, CSV and JSON, and the same probabilities through an exported ONNX model."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FOLDER_CLASSES, FOLDER_SPLITS
from data_formats import write_truncated_jpeg
from thaw.analysis.gradcam import explain_image
from thaw.checkpoint import CheckpointError
from thaw.cli import is_user_error
from thaw.config import compose_config
from thaw.data.images import load_image
from thaw.evaluate import evaluate
from thaw.export import export_model
from thaw.inference.inputs import resolve_inputs
from thaw.inference.metadata import FLOAT_INPUT, UINT8_INPUT
from thaw.inference.predictor import channels_last_on, tta_views
from thaw.models import load_trained
from thaw.predict import predict
from thaw.preprocess import Preprocessing

CLASSES = sorted(FOLDER_CLASSES)  # an image folder's classes are its sorted folder names
N_TEST = FOLDER_SPLITS["test"] * len(FOLDER_CLASSES)
COLUMNS = ["path", "label", "prob", "score", "known"]  # the model has a rejection rule
COLUMNS += [f"top{i}_{v}" for i in range(1, len(CLASSES) + 1) for v in ("label", "prob")]
COLUMNS += ["error"]


def run_predict(out_dir: Path, *overrides: str) -> Path:
    """predict.py with `overrides`, in process, writing into `out_dir`; the output file. On the
    CPU, as eval.py and ONNX Runtime run here (cuDNN's TF32 convolutions would differ by more
    than the 1e-4 compared)."""
    return predict(compose_config("predict", ["device=cpu", *overrides], out_dir))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def probabilities(rows: list[dict[str, str]]) -> torch.Tensor:
    """(N, classes) in CLASSES order, from the top-k columns of complete rows."""
    table = torch.zeros(len(rows), len(CLASSES), dtype=torch.float64)
    for i, row in enumerate(rows):
        for k in range(1, len(CLASSES) + 1):
            table[i, CLASSES.index(row[f"top{k}_label"])] = float(row[f"top{k}_prob"])
    return table


def accuracy(rows: list[dict[str, str]]) -> float:
    """Predicted labels against the class folder each file is in."""
    return sum(row["label"] == Path(row["path"]).parent.name for row in rows) / len(rows)


def run_eval(out_dir: Path, ckpt: str, *overrides: str) -> dict:
    cfg = compose_config(
        "eval",
        [f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"]
        + [*overrides],
        out_dir,
    )
    return evaluate(cfg)


@pytest.fixture(scope="module")
def ckpt(folder_run: Path) -> Path:
    return folder_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def plain_rows(ckpt: Path, photo_folder: Path, tmp_path_factory) -> list[dict[str, str]]:
    """The checkpoint's predictions on the folder's test images, without TTA."""
    out = run_predict(
        tmp_path_factory.mktemp("plain"), f"ckpt_path={ckpt}", f"inputs={photo_folder / 'test'}"
    )
    return read_csv(out)


def test_predictions_give_evals_accuracy(plain_rows, ckpt, photo_folder, tmp_path):
    assert list(plain_rows[0]) == COLUMNS  # top_k=5 capped at the 3 classes
    assert len(plain_rows) == N_TEST
    assert [row["path"] for row in plain_rows] == sorted(
        str(p) for p in (photo_folder / "test").rglob("*.png")
    )
    for row in plain_rows:
        assert row["error"] == "" and row["label"] == row["top1_label"] in CLASSES
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and float(row["prob"]) == probs[0]
    metrics = run_eval(tmp_path / "eval", str(ckpt))
    assert accuracy(plain_rows) == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert 0.5 < metrics["test/acc"]  # it learned: chance is 1/3


def test_tta_changes_probabilities_and_a_doubled_ensemble_changes_nothing(
    plain_rows, ckpt, photo_folder, tmp_path
):
    plain = probabilities(plain_rows)
    assert plain.sum(dim=1) == pytest.approx(torch.ones(N_TEST), abs=1e-5)
    test_dir = f"inputs={photo_folder / 'test'}"
    tta_rows = {}
    for tta in ("flip", "flip_crop"):
        out = run_predict(tmp_path / tta, f"ckpt_path={ckpt}", test_dir, f"tta={tta}")
        tta_rows[tta] = read_csv(out)
        probs = probabilities(tta_rows[tta])
        assert probs.sum(dim=1) == pytest.approx(torch.ones(N_TEST), abs=1e-5)
        assert (probs - plain).abs().max() > 1e-3, tta
    flip, flip_crop = (probabilities(tta_rows[t]) for t in ("flip", "flip_crop"))
    assert (flip_crop - flip).abs().max() > 1e-3

    out = run_predict(tmp_path / "ensemble", f"ckpt_path=[{ckpt},{ckpt}]", test_dir)
    assert probabilities(read_csv(out)) == pytest.approx(plain, abs=1e-6)

    # eval.py: the same TTA on the DataModule's test batches, with and without it, and ensembles.
    single = run_eval(tmp_path / "eval", str(ckpt), "tta=flip")
    assert single["tta"] == "flip"
    assert single["test/acc"] == pytest.approx(accuracy(plain_rows), abs=1e-6)
    assert single["test/acc_tta"] == pytest.approx(accuracy(tta_rows["flip"]), abs=1e-6)
    ensemble = run_eval(tmp_path / "eval2", f"[{ckpt},{ckpt}]", "tta=flip")
    assert "test/acc_top5" not in single  # 3 classes: top-5 would always be 1
    for key in ("test/acc", "test/f1_macro"):
        assert ensemble[key] == pytest.approx(single[key], abs=1e-6), key
        assert ensemble[key + "_tta"] == pytest.approx(single[key + "_tta"], abs=1e-6), key
    written = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert written["checkpoint"] == [str(ckpt), str(ckpt)]
    assert written["test/acc_tta"] == ensemble["test/acc_tta"]


def test_an_ensemble_gives_each_model_its_own_preprocessing(
    plain_rows, ckpt, photo_folder, tmp_path
):
    zoomed = tmp_path / "zoomed.ckpt"  # the same weights, seeing a centre crop of a larger resize
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["thaw"]["preprocessing"]["resize_size"] = 36
    torch.save(checkpoint, zoomed)
    test_dir = f"inputs={photo_folder / 'test'}"
    alone = probabilities(read_csv(run_predict(tmp_path / "z", f"ckpt_path={zoomed}", test_dir)))
    plain = probabilities(plain_rows)
    assert (alone - plain).abs().max() > 1e-3
    both = run_predict(tmp_path / "both", f"ckpt_path=[{ckpt},{zoomed}]", test_dir)
    assert probabilities(read_csv(both)) == pytest.approx((plain + alone) / 2, abs=1e-6)
    # eval.py preprocesses the test images once per preprocessing and averages the same way.
    ensemble = run_eval(tmp_path / "eval", f"[{ckpt},{zoomed}]")
    assert ensemble["test/acc"] == pytest.approx(accuracy(read_csv(both)), abs=1e-6)

    checkpoint["thaw"]["classes"] = CLASSES[::-1]
    reordered = tmp_path / "reordered.ckpt"
    torch.save(checkpoint, reordered)
    listed = f"{ckpt} has {CLASSES}, {reordered} has {CLASSES[::-1]}"
    with pytest.raises(ValueError, match=re.escape(listed)):
        run_predict(tmp_path / "bad", f"ckpt_path=[{ckpt},{reordered}]", test_dir)


def test_flip_crop_views_are_shifts_padded_with_black_in_any_input_encoding():
    pre = Preprocessing(input_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    views = tta_views(images, "flip_crop", torch.zeros(3))
    assert len(views) == 6 and torch.equal(views[1], images.flip(-1))
    shifted = torch.zeros_like(images)  # the top-left crop: the image moved down and right by 1
    shifted[..., 1:, 1:] = images[..., :-1, :-1]
    assert torch.equal(views[2], shifted)
    # Flips and shifts commute with the per-channel normalisation when the padding is black as
    # the normalised input encodes it: uint8 and float models see the same views.
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    normalized = (images / 255 - mean) / std
    black = -torch.tensor(pre.mean) / torch.tensor(pre.std)
    for view, float_view in zip(views, tta_views(normalized, "flip_crop", black), strict=True):
        assert ((view / 255 - mean) / std) == pytest.approx(float_view, abs=1e-6)


def test_a_corrupt_file_gets_an_error_row_and_the_others_are_predicted(
    plain_rows, ckpt, photo_folder, tmp_path, caplog
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((photo_folder / "test" / "Bag").glob("*.png"))[:2]
    for path in good:
        shutil.copy(path, folder)
    bad = write_truncated_jpeg(folder / "000_cut.jpg")
    out = run_predict(tmp_path / "run", f"ckpt_path={ckpt}", f"inputs={folder}")
    rows = read_csv(out)
    assert [row["path"] for row in rows] == [str(folder / p.name) for p in good[:1]] + [
        str(bad),
        str(folder / good[1].name),
    ]
    error_row = rows[1]
    assert "could not decode image" in error_row["error"] and str(bad) in error_row["error"]
    assert all(error_row[c] == "" for c in COLUMNS if c not in ("path", "error"))
    expected = {row["path"]: row for row in plain_rows}
    for row, source in zip((rows[0], rows[2]), good, strict=True):
        assert row["error"] == "" and row["label"] == expected[str(source)]["label"]
        assert float(row["prob"]) == pytest.approx(float(expected[str(source)]["prob"]), abs=1e-6)
    assert "1 of 3 files could not be decoded" in caplog.text


def test_json_output_holds_the_csv_rows(plain_rows, ckpt, photo_folder, tmp_path):
    folder = photo_folder / "test" / "Sneaker"
    out = run_predict(tmp_path, f"ckpt_path={ckpt}", f"inputs={folder}", "out=predictions.json")
    assert out == tmp_path / "predictions.json"
    rows = json.loads(out.read_text())
    expected = [row for row in plain_rows if Path(row["path"]).parent == folder]
    assert [list(row) for row in rows] == [COLUMNS] * len(expected)
    for row, csv_row in zip(rows, expected, strict=True):
        assert row["path"] == csv_row["path"] and row["error"] is None
        assert row["top2_label"] == csv_row["top2_label"]
        assert row["top2_prob"] == pytest.approx(float(csv_row["top2_prob"]), abs=1e-6)


def test_explain_writes_an_overlay_of_each_predicted_class(
    plain_rows, ckpt, photo_folder, tmp_path
):
    folder = tmp_path / "photos"  # two files named 000.png, and one that cannot be decoded
    sources = [photo_folder / "test" / name / "000.png" for name in ("Bag", "Trouser")]
    for source in sources:
        (folder / source.parent.name).mkdir(parents=True)
        shutil.copy(source, folder / source.parent.name)
    bad = write_truncated_jpeg(folder / "cut.jpg")
    out = run_predict(tmp_path / "run", f"ckpt_path={ckpt}", f"inputs={folder}", "explain=true")
    rows = read_csv(out)
    assert list(rows[0]) == [*COLUMNS, "explanation"]
    assert [row["path"] for row in rows] == [
        str(folder / "Bag" / "000.png"),
        str(folder / "Trouser" / "000.png"),
        str(bad),
    ]
    assert rows[2]["error"] and rows[2]["explanation"] == ""
    expected = {row["path"]: row for row in plain_rows}
    trained = load_trained(ckpt)
    for index, (row, source) in enumerate(zip(rows[:2], sources, strict=True)):
        assert row["label"] == expected[str(source)]["label"]  # explaining changes no prediction
        assert row["explanation"] == str(out.parent / "explain" / f"{index}_000.png")
        with Image.open(row["explanation"]) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB"
            assert picture.size == (28, 28)  # the model's input view, as the model saw it
            written = np.asarray(picture, dtype=int)
        # The overlay of the predicted class's Grad-CAM, as explain_image draws it.
        target = CLASSES.index(row["label"])
        _, drawn = explain_image(trained, load_image(Path(row["path"])), target)
        assert np.abs(written - np.asarray(drawn, dtype=int)).max() <= 1


def test_inputs_resolve_folders_globs_files_and_lists(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    for name in ("b.png", "sub/a.JPG", ".thumbs/c.png", ".d.png"):
        Image.new("RGB", (4, 4)).save(root / name, "PNG")
    (root / "notes.csv").write_text("not an image\n")
    listing = tmp_path / "lists" / "mine.txt"
    listing.parent.mkdir()
    listing.write_text(f"../photos/sub/a.JPG\n\n{root / 'b.png'}\n")

    assert resolve_inputs(root) == [root / "b.png", root / "sub" / "a.JPG"]
    assert resolve_inputs(f"{root}/**/*.png") == [root / "b.png"]
    assert resolve_inputs(f"{root}/*/*") == [root / "sub" / "a.JPG"]
    assert resolve_inputs(str(root / "sub" / "a.JPG")) == [root / "sub" / "a.JPG"]
    assert resolve_inputs(listing) == [listing.parent / "../photos/sub/a.JPG", root / "b.png"]
    for nothing in (tmp_path / "lists", root / "notes.csv", f"{root}/*.gif", tmp_path / "gone"):
        with pytest.raises(ValueError, match=r"matches no image file\. Give a folder"):
            resolve_inputs(nothing)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["inputs={empty}"], ValueError, "matches no image file"),
        (["ckpt_path={foreign}"], CheckpointError, "is not a thaw checkpoint"),
        (["ckpt_path=null"], ValueError, "not neither"),
        (["model_path=model.onnx"], ValueError, "not both"),
        (["tta=mirror"], ValueError, r"tta must be one of \['none', 'flip', 'flip_crop'\]"),
        (["out=predictions.txt"], ValueError, "must end in .csv or .json"),
        (["top_k=0"], ValueError, "top_k must be an integer >= 1"),
        (["explain=yes"], ValueError, "explain must be true or false"),
        (
            ["explain=true", "ckpt_path=null", "model_path=model.onnx"],
            ValueError,
            r"explain=true needs the PyTorch model.*give ckpt_path=",
        ),
        (["explain=true", "ckpt_path=[{ckpt},{ckpt}]"], ValueError, "needs one checkpoint"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    ckpt, photo_folder, tmp_path, overrides, error, message
):
    foreign = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    values = {"foreign": foreign, "empty": empty, "ckpt": ckpt}
    base = [f"ckpt_path={ckpt}", f"inputs={photo_folder / 'test'}"]
    cfg = compose_config(
        "predict", base + [o.format(**values) for o in overrides], tmp_path / "run"
    )
    with pytest.raises(error, match=message) as refused:
        predict(cfg)
    assert is_user_error(refused.value)  # the command line: one paragraph, status 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("out", ["{tmp}/afile/preds.csv", "/proc/thaw_predictions.csv"])
def test_an_out_that_cannot_be_written_is_refused_before_the_model_is_loaded(
    photo_folder, tmp_path, out
):
    (tmp_path / "afile").write_text("a file, not a folder\n")
    missing = tmp_path / "missing.ckpt"  # were it loaded first, this would be the error
    overrides = [f"ckpt_path={missing}", f"inputs={photo_folder / 'test'}"]
    cfg = compose_config(
        "predict", [*overrides, f"out={out.format(tmp=tmp_path)}"], tmp_path / "run"
    )
    message = r"out=.* cannot be written: .* Give out=<a file"
    with pytest.raises(ValueError, match=message) as refused:
        predict(cfg)
    assert is_user_error(refused.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("layout", "tta"), [(FLOAT_INPUT, "none"), (UINT8_INPUT, "flip_crop")])
def test_onnx_predictions_match_the_checkpoints(
    plain_rows, ckpt, photo_folder, tmp_path, layout, tta
):
    model = export_model(
        load_trained(ckpt), ckpt, "onnx", tmp_path, normalize_in_graph=layout == UINT8_INPUT
    )
    test_dir = f"inputs={photo_folder / 'test'}"
    rows = read_csv(run_predict(tmp_path / "onnx", f"model_path={model}", test_dir, f"tta={tta}"))
    torch_rows = plain_rows
    if tta != "none":
        torch_rows = read_csv(
            run_predict(tmp_path / "ckpt", f"ckpt_path={ckpt}", test_dir, f"tta={tta}")
        )
    assert [row["path"] for row in rows] == [row["path"] for row in torch_rows]
    assert (probabilities(rows) - probabilities(torch_rows)).abs().max() <= 1e-4
    assert [row["label"] for row in rows] == [row["label"] for row in torch_rows]


def test_console_script_shows_the_predict_config():
    script = Path(sys.executable).parent / "thaw-predict"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    keys = ("ckpt_path:", "model_path:", "inputs:", "tta: none", "top_k: 5", "explain: false")
    for key in (*keys, "task_name"):
        assert key in result.stdout, key


def test_inference_and_serving_import_no_training_code():
    training = ["thaw.train", "thaw.build", "thaw.finetune", "thaw.resume", "thaw.data.datamodule"]
    training += ["thaw.data.augment", "thaw.data.resumable"]
    code = (
        "import sys, thaw.predict, thaw.inference.inputs, thaw.inference.predictor, thaw.serve, "
        "thaw.analysis.gradcam; "
        f"print(sorted(m for m in sys.modules if m in {training} or "
        f"m.startswith(tuple(t + '.' for t in {training}))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_model_is_laid_out_nhwc_on_any_cuda_device_and_only_there():
    assert channels_last_on("cuda") and channels_last_on("cuda:1")
    assert not channels_last_on("cpu") and not channels_last_on(torch.device("cpu"))
