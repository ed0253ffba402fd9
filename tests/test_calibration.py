"""Calibration: ECE and reliability bins computed by hand, temperature scaling that recovers a
known temperature, and the fitted temperature travelling from training through the checkpoint
(and an exported file's metadata) into every probability the Predictor gives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from thaw.analysis.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from thaw.checkpoint import FORMAT, update_run_record, weights_digest
from thaw.inference.metadata import FLOAT_INPUT, ExportMetadata
from thaw.inference.predictor import Member, Predictor
from thaw.models import load_trained
from thaw.postprocess import Postprocessing, split_legacy_preprocessing
from thaw.preprocess import Preprocessing
from thaw.train import run

# 8 samples, 3 classes: (probabilities, label). Top-1 confidence, right or wrong, in the comment.
SAMPLES = [
    ([0.90, 0.05, 0.05], 0),  # 0.90 right
    ([0.10, 0.85, 0.05], 1),  # 0.85 right
    ([0.10, 0.05, 0.85], 0),  # 0.85 wrong
    ([0.70, 0.20, 0.10], 0),  # 0.70 right
    ([0.25, 0.65, 0.10], 2),  # 0.65 wrong
    ([0.50, 0.30, 0.20], 0),  # 0.50 right
    ([0.30, 0.25, 0.45], 1),  # 0.45 wrong
    ([0.35, 0.33, 0.32], 0),  # 0.35 right
]
PROBABILITIES = torch.tensor([p for p, _ in SAMPLES])
LABELS = torch.tensor([label for _, label in SAMPLES])

# Those samples in 5 bins of width 0.2: (count, mean confidence, accuracy); None when empty.
FIVE_BINS = [
    (0, None, None),  # [0.0, 0.2)
    (1, 0.35, 1.0),  # [0.2, 0.4): 0.35 right
    (2, (0.50 + 0.45) / 2, 0.5),  # [0.4, 0.6): 0.50 right, 0.45 wrong
    (2, (0.70 + 0.65) / 2, 0.5),  # [0.6, 0.8): 0.70 right, 0.65 wrong
    (3, (0.90 + 0.85 + 0.85) / 3, 2 / 3),  # [0.8, 1.0]: 0.90 right, 0.85 right, 0.85 wrong
]


def test_ece_is_the_weighted_gap_of_bins_written_out_by_hand():
    by_hand = sum(n / 8 * abs(acc - conf) for n, conf, acc in FIVE_BINS if n)
    assert by_hand == pytest.approx(1.65 / 8)
    assert expected_calibration_error(PROBABILITIES, LABELS, n_bins=5) == pytest.approx(by_hand)
    # 15 bins of 1/15: only the two 0.85s share a bin ([0.8, 0.867): one right, one wrong);
    # every other sample is alone, its gap 1 - confidence if right, confidence if wrong.
    alone = (1 - 0.90) + (1 - 0.70) + 0.65 + (1 - 0.50) + 0.45 + (1 - 0.35)
    shared = 2 * abs(0.5 - 0.85)
    assert expected_calibration_error(PROBABILITIES, LABELS) == pytest.approx((alone + shared) / 8)
    # A perfectly calibrated set: 0.75 confident and right 3 times in 4.
    calibrated = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(calibrated, torch.tensor([0, 0, 0, 1])) == pytest.approx(0)


def test_reliability_bins_match_the_bins_by_hand_and_count_every_sample():
    bins = reliability_bins(PROBABILITIES, LABELS, n_bins=5)
    assert [b[side] for b in bins for side in ("lower", "upper")] == pytest.approx(
        [0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0]
    )
    assert sum(b["count"] for b in bins) == len(LABELS)
    for got, (count, confidence, accuracy) in zip(bins, FIVE_BINS, strict=True):
        assert got["count"] == count
        assert got["confidence"] == (None if confidence is None else pytest.approx(confidence))
        assert got["accuracy"] == (None if accuracy is None else pytest.approx(accuracy))
    json.dumps(bins, allow_nan=False)  # empty bins are null, not NaN: the list is valid JSON
    # A confidence of exactly 1.0 falls in the last bin, not outside the diagram.
    certain = reliability_bins(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), 4)
    assert [b["count"] for b in certain] == [0, 0, 0, 2] and certain[-1]["accuracy"] == 0.5
    # The ECE is the bins' weighted gap.
    weighted = sum(
        b["count"] / 8 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]
    )
    assert weighted == pytest.approx(expected_calibration_error(PROBABILITIES, LABELS, n_bins=5))


def test_measures_refuse_shapes_that_do_not_match():
    with pytest.raises(ValueError, match="one label per row"):
        expected_calibration_error(PROBABILITIES, LABELS[:3])
    with pytest.raises(ValueError, match="N, classes"):
        reliability_bins(PROBABILITIES[0], LABELS)
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(PROBABILITIES, LABELS, n_bins=0)
    with pytest.raises(ValueError, match="at least one sample"):
        fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long))


def sampled(n: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z (n, 10) and labels drawn from softmax(z): a model calibrated by construction."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, 10, generator=generator)
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator)[:, 0]
    return logits, labels


def test_fit_temperature_recovers_the_temperature_that_made_logits_overconfident():
    logits, labels = sampled(3000, 2.0, seed=0)
    overconfident = 4 * logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    before = negative_log_likelihood(overconfident, labels)
    after = negative_log_likelihood(overconfident, labels, temperature)
    assert after < before
    # The minimum: a little either side is worse.
    for nearby in (0.9 * temperature, 1.1 * temperature):
        assert negative_log_likelihood(overconfident, labels, nearby) > after
    assert fit_temperature(overconfident, labels) == temperature  # deterministic
    # ... and the ECE drops with it.
    ece_before = expected_calibration_error(overconfident.softmax(1), labels)
    ece_after = expected_calibration_error((overconfident / temperature).softmax(1), labels)
    assert ece_after < ece_before / 2


def test_fit_temperature_leaves_calibrated_logits_near_one_and_sharpens_underconfident_ones():
    logits, labels = sampled(3000, 2.0, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.1)


def test_fit_temperature_stays_in_its_range_when_the_nll_has_no_minimum():
    logits = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    right = logits.argmax(1)  # every prediction right: the NLL falls as T -> 0
    assert fit_temperature(logits, right) == pytest.approx(MIN_TEMPERATURE)
    wrong = (right + 1) % 3  # every prediction wrong: it falls as T grows
    assert fit_temperature(logits, wrong) == pytest.approx(MAX_TEMPERATURE)


def test_negative_log_likelihood_is_the_mean_cross_entropy_at_the_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    by_hand = [
        -math.log(math.exp(1.0) / (math.exp(1.0) + 1 + math.exp(-0.5))),
        -math.log(1 / (math.exp(0.25) + math.exp(0.75) + 1)),
    ]
    assert negative_log_likelihood(logits, labels, 2.0) == pytest.approx(sum(by_hand) / 2)


# ---------------------------------------------------------------------------- postprocessing
BASE = {"input_size": 4, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


def test_temperature_round_trips_and_defaults_to_one():
    warm = Postprocessing(temperature=1.7)
    assert warm.to_dict()["temperature"] == 1.7
    assert Postprocessing.from_dict(warm.to_dict()) == warm
    assert Postprocessing.from_dict(json.loads(json.dumps(warm.to_dict()))) == warm
    # A checkpoint or exported file from before the temperature: a preprocessing record alone.
    older = Preprocessing(**BASE).to_dict()
    preprocessing, postprocessing = split_legacy_preprocessing(older)
    assert preprocessing == older and Postprocessing.from_dict(postprocessing).temperature == 1.0
    assert Postprocessing().temperature == 1.0
    assert Postprocessing(temperature=2).temperature == 2.0  # an int is a number


@pytest.mark.parametrize("bad", [0, 0.0, -1.5, float("nan"), float("inf"), "2.0", None, True])
def test_a_temperature_that_is_not_a_positive_finite_number_is_refused(bad):
    with pytest.raises(ValueError, match="temperature"):
        Postprocessing(temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        Postprocessing.from_dict({**Postprocessing().to_dict(), "temperature": bad})


def test_an_exported_files_metadata_carries_the_temperature():
    metadata = ExportMetadata(
        ["a", "b"], Preprocessing(**BASE), Postprocessing(temperature=2.5), FLOAT_INPUT, "x"
    )
    assert ExportMetadata.from_strings(metadata.to_strings(), "model.onnx") == metadata
    strings = metadata.to_strings()
    del strings["thaw.postprocessing"]  # a file exported before the temperature was saved
    assert ExportMetadata.from_strings(strings, "old.onnx").postprocessing.temperature == 1.0
    # A file exported while the temperature was a field of the preprocessing keeps it.
    strings["thaw.preprocessing"] = json.dumps(
        {**Preprocessing(**BASE).to_dict(), "temperature": 2.5}
    )
    assert ExportMetadata.from_strings(strings, "old.onnx") == metadata


# ---------------------------------------------------------------------------- predictor
class Linear(nn.Module):
    """A model small enough to check by hand: logits = W . flattened input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 3, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(3, 48, generator=torch.Generator().manual_seed(3)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs.flatten(1))


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_the_predictor_gives_the_softmax_of_the_logits_divided_by_the_temperature(tta):
    model = Linear().eval()
    batch = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    weights = model.linear.weight.detach()

    def by_hand(images: torch.Tensor, temperature: float) -> torch.Tensor:
        logits = images.flatten(1) @ weights.T
        return (logits / temperature).exp() / (logits / temperature).exp().sum(1, keepdim=True)

    views = [batch] if tta == "none" else [batch, batch.flip(-1)]
    for temperature in (1.0, 3.0, 0.5):
        member = Member(model, Preprocessing(**BASE), Postprocessing(temperature=temperature))
        got = Predictor([member], ["a", "b", "c"], tta).batch_probabilities([batch])
        expected = sum(by_hand(view, temperature) for view in views) / len(views)
        assert got == pytest.approx(expected, abs=1e-6)
    # An ensemble averages each member's own calibrated probabilities.
    hot, cold = (Member(model, Preprocessing(**BASE), Postprocessing(t)) for t in (3.0, 0.5))
    both = Predictor([hot, cold], ["a", "b", "c"], tta).batch_probabilities([batch, batch])
    expected = sum(by_hand(v, 3.0) + by_hand(v, 0.5) for v in views) / (2 * len(views))
    assert both == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------- after training
def test_training_fits_the_temperature_into_best_ckpt_and_calibrate_false_leaves_it(
    train_config,
):
    cfg = train_config("finetune=full", "trainer.max_epochs=1")
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    best = run_dir / "checkpoints" / "best.ckpt"
    temperature = load_trained(best).postprocessing.temperature
    assert temperature != 1.0 and temperature == pytest.approx(metrics["temperature"])
    assert metrics["val/nll_calibrated"] <= metrics["val/nll"]
    # The same figures in metrics.json, beside the test metrics.
    written = json.loads((run_dir / "metrics.json").read_text())
    for key in ("temperature", "val/nll", "val/nll_calibrated", "val/ece", "val/ece_calibrated"):
        assert written[key] == pytest.approx(metrics[key]), key
    assert "test/acc" in written
    # Rewritten whole and in place: every entry kept, no temporary file left behind, and
    # last.ckpt (what a resume reads) untouched.
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    saved = torch.load(best, weights_only=True)
    last = torch.load(best.parent / "last.ckpt", weights_only=True)
    assert set(saved) == set(last)
    assert last["thaw"]["postprocessing"]["temperature"] == 1.0
    assert saved["thaw"]["config"] == last["thaw"]["config"]

    off = train_config(
        "finetune=full", "trainer.max_epochs=1", "calibrate=false", "test=false", run="off"
    )
    off_metrics = run(off)
    off_best = Path(off.paths.output_dir) / "checkpoints" / "best.ckpt"
    assert load_trained(off_best).postprocessing.temperature == 1.0
    assert not {"temperature", "val/nll", "val/nll_calibrated"} & set(off_metrics)
    # Both runs trained the same weights (same seed); only the temperature differs.
    on_weights = torch.load(best, weights_only=True)["state_dict"]
    for key, value in torch.load(off_best, weights_only=True)["state_dict"].items():
        assert torch.equal(value, on_weights[key]), key


def test_a_run_without_a_best_checkpoint_skips_the_temperature(train_config):
    metrics = run(train_config("+trainer.fast_dev_run=true"))  # Lightning saves no checkpoint
    assert "temperature" not in metrics and "test/acc" in metrics, sorted(metrics)


def test_update_run_record_rewrites_only_what_it_is_given(tmp_path):
    path = tmp_path / "model.ckpt"
    record = {
        "config": {"a": 1},
        "classes": ["x", "y"],
        "preprocessing": {"input_size": 4},
        "postprocessing": Postprocessing().to_dict(),
        "format": FORMAT,
    }
    torch.save({"state_dict": {"w": torch.ones(2)}, "thaw": record}, path)
    path.chmod(0o640)
    post = Postprocessing(temperature=1.5).to_dict()
    update_run_record(path, postprocessing=post)
    saved = torch.load(path, weights_only=True)
    digest = weights_digest(saved["state_dict"])  # every save stamps the weights' digest
    assert saved["thaw"] == {**record, "postprocessing": post, "weights_sha256": digest}
    assert torch.equal(saved["state_dict"]["w"], torch.ones(2))
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]
