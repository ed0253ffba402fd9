"""export.py on a model trained on real photos: ONNX fp32, uint8 input, INT8 and torch.export
files that carry their preprocessing and agree with the checkpoint; a parity gate that refuses a
model that does not; and bad input that writes nothing."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import FOLDER_CLASSES, FOLDER_SPLITS
from thaw.checkpoint import CheckpointError, run_dir
from thaw.config import compose_config
from thaw.data.sources.base import ImageSet
from thaw.data.sources.imagefolder import ImageFolder
from thaw.errors import UserError
from thaw.export import (
    MIN_CALIBRATION_IMAGES,
    check_images,
    export,
    export_model,
    stratified_sample,
    write_gated,
)
from thaw.inference.export_formats import ExportError
from thaw.inference.metadata import ExportMetadata
from thaw.inference.onnx_model import OnnxModel
from thaw.inference.parity import CheckImages, ParityError, check_parity
from thaw.inference.predictor import Predictor
from thaw.models import ImageClassifier, load_trained
from thaw.preprocess import Preprocessing
from thaw.serving.served import load_served

ROOT = Path(__file__).resolve().parents[1]
N_VAL = FOLDER_SPLITS["val"] * len(FOLDER_CLASSES)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(folder_run: Path) -> Path:
    return folder_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def trained(checkpoint: Path) -> ImageClassifier:
    return load_trained(checkpoint)


@pytest.fixture(scope="module")
def test_files(photo_folder: Path) -> list[Path]:
    return sorted((photo_folder / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def expected(trained: ImageClassifier, test_files: list[Path]) -> torch.Tensor:
    """The checkpoint's probabilities on the test photos, through thaw's own transform."""
    with torch.inference_mode():
        return trained(preprocessed(test_files, trained.preprocessing)).softmax(1)


@pytest.fixture(scope="module")
def onnx_path(
    checkpoint, trained: ImageClassifier, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return export_model(trained, checkpoint, "onnx", tmp_path_factory.mktemp("onnx"))


def records(path: Path) -> dict:
    return json.loads((path.parent / "export.json").read_text())


def ort_probabilities(path: Path, batch: np.ndarray) -> torch.Tensor:
    """Plain ONNX Runtime, as someone without thaw runs the file."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {session.get_inputs()[0].name: batch})
    return torch.from_numpy(logits).softmax(1)


def preprocessed(files: list[Path], preprocessing: Preprocessing, **options) -> torch.Tensor:
    """The photos through thaw's evaluation transform (`normalize=False`: the uint8 crop)."""
    transform = preprocessing.transform(**options)
    return torch.stack([transform(Image.open(path)) for path in files])


# ---------------------------------------------------------------------------------- formats
def test_onnx_export_writes_the_model_and_its_record_and_agrees_with_the_checkpoint(
    checkpoint, onnx_path, trained, test_files, expected
):
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["export.json", "model.onnx"]
    record = records(onnx_path)["model.onnx"]
    assert record["format"] == "onnx"
    assert record["size_bytes"] == onnx_path.stat().st_size
    assert record["images"] == N_VAL  # every validation photo (12 per class) was checked
    assert record["images_from"] == "validation split of the run"
    assert record["max_softmax_diff"] <= TOLERANCE
    assert record["top1_agreement"] == 1.0
    assert record["accuracy_exported"] == record["accuracy_checkpoint"] > 1 / len(FOLDER_CLASSES)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["source_checkpoint"] == {"file": "best.ckpt", "sha256": digest}
    assert record["input_layout"] == "float32_normalized"

    model = OnnxModel(onnx_path)
    batch = preprocessed(test_files, model.metadata.preprocessing)
    got = model(batch).softmax(1)
    assert (got - expected).abs().max() <= TOLERANCE
    one = model(batch[:1]).softmax(1)  # the batch axis is dynamic
    assert (one - expected[:1]).abs().max() <= TOLERANCE


def test_by_default_the_export_goes_into_the_checkpoints_run_dir(folder_run):
    assert run_dir(folder_run / "checkpoints" / "best.ckpt") == folder_run.resolve()


def test_onnx_file_holds_each_weight_once(onnx_path, trained):
    graph = onnx.load(str(onnx_path)).graph
    names = [init.name for init in graph.initializer]
    assert len(names) == len(set(names))
    weight_bytes = sum(p.numel() * 4 for p in trained.parameters())
    weight_bytes += sum(b.numel() * 4 for b in trained.rejection.buffers())  # class means etc.
    assert weight_bytes < onnx_path.stat().st_size < 1.02 * weight_bytes
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch


def test_a_third_party_rebuilds_the_preprocessing_from_the_onnx_metadata_alone(
    onnx_path, test_files, expected
):
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    prep = json.loads(props["thaw.preprocessing"])
    classes = json.loads(props["thaw.classes"])
    assert props["thaw.input_layout"] == "float32_normalized"
    # Plain PIL and torchvision from the JSON values; no thaw code.
    steps = [transforms.Grayscale(3)] if prep["grayscale"] else []
    transform = transforms.Compose(
        [
            *steps,
            transforms.Resize(prep["resize_size"]),
            transforms.CenterCrop(prep["input_size"]),
            transforms.ToTensor(),
            transforms.Normalize(prep["mean"], prep["std"]),
        ]
    )
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in test_files])
    got = ort_probabilities(onnx_path, batch.numpy())
    assert (got - expected).abs().max() <= TOLERANCE
    labels = [classes[i] for i in got.argmax(1)]
    correct = sum(label == path.parent.name for label, path in zip(labels, test_files, strict=True))
    assert correct / len(test_files) > 1 / len(classes)


def test_normalize_in_graph_takes_uint8_rgb_and_agrees(
    checkpoint, trained, tmp_path, photo_folder, test_files, expected
):
    # Checked on a folder of class folders given with images=, rather than the run's val split.
    images = photo_folder / "test"
    path = export_model(
        trained, checkpoint, "onnx", tmp_path, images=images, normalize_in_graph=True
    )
    record = records(path)["model.onnx"]
    assert record["images_from"] == str(images)
    assert record["images"] == FOLDER_SPLITS["test"] * len(FOLDER_CLASSES)
    assert record["max_softmax_diff"] <= TOLERANCE
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {p.key: p.value for p in model.metadata_props}["thaw.input_layout"] == "uint8_rgb"
    got = ort_probabilities(
        path, preprocessed(test_files, trained.preprocessing, normalize=False).numpy()
    )
    assert (got - expected).abs().max() <= TOLERANCE


def test_int8_passes_its_gate_in_a_quarter_of_the_size(
    checkpoint, trained, onnx_path, test_files, expected
):
    path = export_model(trained, checkpoint, "onnx_int8", onnx_path.parent)
    both = records(path)  # one export.json for the run dir, a record per file
    assert sorted(both) == ["model.onnx", "model_int8.onnx"]
    record = both["model_int8.onnx"]
    assert record["accuracy_checkpoint"] - record["accuracy_exported"] <= 0.01
    assert record["calibration_images"] == 40 * len(FOLDER_CLASSES)  # all 40 a class (< 256/3)
    assert onnx_path.stat().st_size >= 3 * path.stat().st_size
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    model = OnnxModel(path)
    got = model(preprocessed(test_files, model.metadata.preprocessing))
    agree = (got.argmax(1) == expected.argmax(1)).float().mean()
    assert agree >= 0.9


def test_int8_calibration_on_too_few_images_warns_in_the_log_and_the_record(
    checkpoint, trained, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="thaw.export"):
        path = export_model(trained, checkpoint, "onnx_int8", tmp_path, calibration_images=90)
    record = records(path)["model_int8.onnx"]
    assert record["calibration_images"] == 90 < MIN_CALIBRATION_IMAGES
    warning = record["warnings"][0]  # the rejection rule's may follow: see rule_warning
    assert all(w in caplog.messages for w in record["warnings"])
    assert "INT8 calibration on 90 images, fewer than 100" in warning
    assert "calibration_images" in warning and "images=<folder" in warning  # the fixes


def test_calibration_images_are_seeded_and_stratified():
    # 3 classes of 50, 20 and 8 images; image i is filled with the value i to identify it.
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 8)
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    pool = ImageSet(images, labels, ["a", "b", "c"])

    def chosen(n: int, seed: int) -> list[int]:
        return stratified_sample(pool, n, seed).images[:, 0, 0, 0].tolist()

    assert chosen(30, seed=0) == chosen(30, seed=0)
    assert chosen(30, seed=0) != chosen(30, seed=1)
    sample = stratified_sample(pool, 30, seed=0)
    assert torch.bincount(sample.labels).tolist() == [10, 10, 8]  # c has only 8
    assert torch.bincount(stratified_sample(pool, 15, 3).labels).tolist() == [5, 5, 5]
    assert sample.classes == pool.classes


def test_torch_export_program_loads_with_its_metadata_and_agrees(
    checkpoint, trained, tmp_path, test_files, expected
):
    path = export_model(trained, checkpoint, "torch_export", tmp_path)
    assert path.name == "model.pt2"
    assert records(path)["model.pt2"]["max_softmax_diff"] <= TOLERANCE
    extra = dict.fromkeys(ExportMetadata.keys(), "")
    module = torch.export.load(str(path), extra_files=extra).module()
    metadata = ExportMetadata.from_strings(extra, str(path))
    assert metadata.classes == trained.classes
    assert metadata.preprocessing == trained.preprocessing
    assert metadata.postprocessing == trained.postprocessing
    batch = preprocessed(test_files, metadata.preprocessing)
    with torch.inference_mode():
        logits, scores = module(batch)  # and the rejection rule's score
        assert (logits.softmax(1) - expected).abs().max() <= TOLERANCE
        assert (module(batch[:1])[0].softmax(1) - expected[:1]).abs().max() <= TOLERANCE
        assert torch.allclose(scores, trained.scored(batch)[1], atol=1e-4, rtol=0)


def test_the_exported_file_names_its_checkpoint_by_basename_and_digest_not_by_path(
    checkpoint, onnx_path
):
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["thaw.source_checkpoint"]) == {"file": "best.ckpt", "sha256": digest}
    assert OnnxModel(onnx_path).metadata.source_checkpoint["sha256"] == digest
    record = (onnx_path.parent / "export.json").read_text()
    for text in (record, *props.values()):
        for folder in (checkpoint.parent, onnx_path.parent, Path("/tmp")):
            assert str(folder) not in text


def test_a_file_exported_with_the_checkpoints_path_is_read_by_its_basename(onnx_path, tmp_path):
    model = onnx.load(str(onnx_path))
    for prop in model.metadata_props:
        if prop.key == "thaw.source_checkpoint":
            prop.value = "/home/someone/runs/a/checkpoints/best.ckpt"  # as older files hold
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    assert OnnxModel(old).metadata.source_checkpoint == {"file": "best.ckpt"}


@pytest.mark.parametrize("damage", ["text", "half"])
def test_a_text_or_truncated_onnx_file_is_refused_naming_it_for_predict_and_serve(
    onnx_path, tmp_path, damage
):
    bad = tmp_path / "model.onnx"
    if damage == "text":
        bad.write_text("not an ONNX model\n")
    else:
        data = onnx_path.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    message = rf"model_path={bad} is not an ONNX model .* Export it again"
    for load in (Predictor.from_onnx, lambda path: load_served([], str(path), "cpu")):
        with pytest.raises(UserError, match=message):
            load(bad)


# ------------------------------------------------------------------------------- the gate
@pytest.fixture(scope="module")
def val_set(photo_folder: Path) -> ImageSet:
    val = ImageFolder(photo_folder).load().val
    assert val is not None
    return val


@pytest.fixture(scope="module")
def val_check(trained: ImageClassifier, val_set: ImageSet) -> CheckImages:
    """The gate's inputs, taken from the validation photos before anything is tampered with."""
    return check_images(val_set, trained.preprocessing, "float32_normalized")


def test_the_gate_refuses_a_model_whose_weights_were_tampered_with(
    checkpoint, trained, val_check, tmp_path
):
    tampered = copy.deepcopy(trained)
    with torch.no_grad():
        weight = tampered.head[1].weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    metadata = ExportMetadata(
        trained.classes,
        trained.preprocessing,
        trained.postprocessing,
        "float32_normalized",
        str(checkpoint),
    )
    out = tmp_path / "out"
    with pytest.raises(ParityError, match=r"max \|softmax difference\| .* top-1 agrees on"):
        write_gated("onnx", tampered, trained, metadata, out, val_check)
    assert not out.exists()


def test_the_gate_refuses_a_preprocessing_mismatch(trained, onnx_path, val_set, val_check):
    # The exported file fed images normalised with other statistics than it was trained with.
    other = Preprocessing(input_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    wrong = check_images(val_set, other, "float32_normalized")
    mismatched = CheckImages(val_check.reference, wrong.exported, val_check.labels)
    with pytest.raises(ParityError, match=f"on {N_VAL} check images"):
        check_parity(trained, OnnxModel(onnx_path), mismatched, quantized=False)
    # The same file, fed what its metadata says, passes.
    assert check_parity(trained, OnnxModel(onnx_path), val_check, quantized=False)


def test_the_int8_gate_refuses_an_accuracy_drop(trained, val_check):
    # A model whose classes were swapped: wrong on nearly every image.
    swapped = copy.deepcopy(trained)
    with torch.no_grad():
        swapped.head[1].weight.copy_(swapped.head[1].weight.roll(1, 0))
        swapped.head[1].bias.copy_(swapped.head[1].bias.roll(1, 0))
    with pytest.raises(ParityError, match=r"accuracy .* points \(at most 1 allowed"):
        check_parity(trained, swapped, val_check, quantized=True)


# ------------------------------------------------------------------------------- bad input
def export_cfg(tmp_path: Path, *overrides: str):
    return compose_config("export", [f"out={tmp_path / 'out'}", *overrides], tmp_path / "run")


@pytest.mark.parametrize("out", ["{tmp}/afile/export", "/proc/thaw_export"])
def test_an_out_that_cannot_be_written_is_refused_before_the_checkpoint_is_read(tmp_path, out):
    (tmp_path / "afile").write_text("a file, not a folder\n")
    missing = tmp_path / "missing.ckpt"  # were it read first, this would be the error
    cfg = compose_config(
        "export", [f"ckpt_path={missing}", f"out={out.format(tmp=tmp_path)}"], tmp_path / "run"
    )
    with pytest.raises(UserError, match=r"out=.* cannot be written: .* Give out=<a folder"):
        export(cfg)


def test_a_checkpoint_that_is_not_thaws_is_refused(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a thaw checkpoint"):
        export(export_cfg(tmp_path, f"ckpt_path={foreign}"))
    assert not (tmp_path / "out").exists()


def test_an_unknown_format_is_refused_with_the_formats_before_any_work(tmp_path):
    # Checked before the checkpoint is read: this one does not even exist.
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(ExportError, match="choose one of onnx, onnx_int8, torch_export"):
        export(export_cfg(tmp_path, f"ckpt_path={missing}", "format=tflite"))
    assert not (tmp_path / "out").exists()


def test_a_count_of_images_below_one_is_refused(checkpoint, trained, tmp_path):
    with pytest.raises(UserError, match=r"parity_images must be an integer >= 1, got 0"):
        export_model(trained, checkpoint, "onnx", tmp_path / "out", parity_images=0)
    assert not (tmp_path / "out").exists()


def test_onnx_export_without_onnxruntime_names_the_extra_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    missing = tmp_path / "missing.ckpt"  # checked before the checkpoint is read
    for format in ("onnx", "onnx_int8"):
        with pytest.raises(UserError, match=r"pip install 'thaw-vision\[export\]'"):
            export(export_cfg(tmp_path, f"ckpt_path={missing}", f"format={format}"))
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_input_with_status_2(folder_run, tmp_path):
    ckpt = folder_run / "checkpoints" / "best.ckpt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "export.py"), f"ckpt_path={ckpt}", "format=tflite"]
        + [f"out={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "format='tflite' is not an export format" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
