"""timm backbones under thaw's fine-tuning engine: one tiny model of each family (a ConvNeXt with
LayerNorm, a MobileNetV3 and a ResNet with BatchNorm, a ViT at 32 px), random init or weights
saved from a model the test built: no download."""

from __future__ import annotations

import hashlib
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub
from pytorch_lightning.utilities.exceptions import SIGTERMException
from safetensors.torch import save, save_file
from timm.models._manipulate import group_parameters
from torch.utils.data import DataLoader, TensorDataset

from classifiers import classifier, task
from conftest import PREPROCESSING, TINY, offline_fmnist
from data_formats import serve_handler
from test_resume import SigtermAt, fit
from thaw.build import build_datamodule
from thaw.config import compose_config
from thaw.export import export_model
from thaw.finetune import FreezeUnfreeze, Full, LinearProbe, TwoPhase, schedulers
from thaw.inference.onnx_model import OnnxModel
from thaw.models import WeightsError, create_backbone, load_trained
from thaw.models.backbones import HEAD, STAGES, backbone_spec
from thaw.models.task import ClassificationTask
from thaw.train import run

SIZE = 32
MODELS = ["convnext_atto", "mobilenetv3_small_050", "resnet10t", "vit_tiny_patch16_224"]


def timm_task(
    name: str, strategy, seed: int = 0, channels_last: bool = False
) -> ClassificationTask:
    torch.manual_seed(seed)
    backbone = create_backbone(name, None, "timm", input_size=SIZE)
    return task(
        classifier(backbone, ["a", "b", "c"], PREPROCESSING, channels_last=channels_last),
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.05),
        finetune=strategy,
        scheduler=partial(schedulers.cosine, warmup_epochs=0.5),
    )


def images(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % 3)


def stage_tensors(model: ClassificationTask) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter and buffer (norm statistics) of each layer group, copied."""
    groups = model.model.layer_groups()
    return {n: {k: v.detach().clone() for k, v in g.tensors().items()} for n, g in groups.items()}


def moved(
    before: dict[str, dict[str, torch.Tensor]], model: ClassificationTask
) -> dict[str, list[str]]:
    """Per group, the tensors that changed."""
    after = stage_tensors(model)
    return {g: [k for k, v in before[g].items() if not torch.equal(v, after[g][k])] for g in before}


@pytest.mark.parametrize("name", MODELS)
def test_freezing_trains_exactly_the_groups_each_strategy_asks_for(name, quiet_trainer):
    def fit(model: ClassificationTask, epochs: int) -> dict[str, list[str]]:
        before = stage_tensors(model)
        trainer = quiet_trainer(
            max_epochs=epochs,
            callbacks=[FreezeUnfreeze(model.finetune)],
            limit_val_batches=0,
        )
        trainer.fit(model, DataLoader(images(), batch_size=8))
        return moved(before, model)

    probe = fit(timm_task(name, LinearProbe()), 1)
    assert all(not probe[stage] for stage in STAGES), probe  # norms and their statistics too
    assert probe[HEAD]

    two_phase = fit(timm_task(name, TwoPhase(freeze_epochs=1, unfreeze_groups=2)), 2)
    assert [g for g in [*STAGES, HEAD] if two_phase[g]] == ["stage3", "stage4", HEAD]

    model = timm_task(name, Full())
    full = fit(model, 1)
    for stage in STAGES:
        params = {n for block in model.model.layer_groups()[stage].blocks for n in block}
        assert params <= set(full[stage]), f"{stage}: {sorted(params - set(full[stage]))[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_groups_are_timms_layers_in_order_with_the_lrs_the_config_says(name):
    model = timm_task(name, TwoPhase(backbone_lr_ratio=0.01))
    timm_layers = group_parameters(
        model.model.backbone, model.model.backbone.group_matcher(coarse=False), reverse=True
    )
    blocks = model.model.backbone_blocks
    assert len(blocks) > len(STAGES)  # finer than the four groups
    assert {n: i for i, b in enumerate(blocks) for n in b.params} == timm_layers
    assert [b.stage for b in blocks] == sorted(b.stage for b in blocks)
    assert blocks[0].stage == "stage1" and {b.stage for b in blocks} == set(STAGES)

    groups = model.model.layer_groups()
    optimizer_groups = model.finetune.param_groups(groups, lr=1e-2, weight_decay=0.05)
    assert sorted(id(p) for g in optimizer_groups for p in g["params"]) == sorted(
        id(p) for p in model.parameters()
    )
    ratio = {g["group"]: g["lr"] / 1e-2 for g in optimizer_groups}
    assert [ratio[g] for g in [*STAGES, HEAD]] == pytest.approx(
        [0.01 ** (k / 4) for k in range(4, -1, -1)]
    )

    decay = TwoPhase(layer_decay=0.75, group_lrs={"stage1": 1e-6})
    per_block = decay.param_groups(groups, lr=1e-2, weight_decay=0.05)
    lrs = {g["name"]: g["lr"] for g in per_block}
    top = len(blocks)
    assert lrs["stage1"] == 1e-6  # group_lrs sets a whole group
    for i, block in enumerate(blocks):
        if block.stage != "stage1":
            assert lrs[f"{block.stage}/block{i:02d}"] == pytest.approx(1e-2 * 0.75 ** (top - i))
    assert lrs[HEAD] == 1e-2
    no_decay = {id(p) for g in per_block if g["weight_decay"] == 0 for p in g["params"]}
    for n, p in model.model.backbone.named_parameters():
        assert (id(p) in no_decay) == (p.ndim <= 1 or n in ("cls_token", "pos_embed")), n


@pytest.mark.parametrize("name", MODELS)
def test_resume_mid_phase_is_bit_exact(name, quiet_trainer, tmp_path):
    def make(seed: int) -> ClassificationTask:
        return timm_task(name, TwoPhase(freeze_epochs=1, unfreeze_groups=2), seed=seed)

    whole, _, whole_lrs = fit(quiet_trainer, tmp_path / "whole", make_model=make)
    with pytest.raises(SIGTERMException):
        fit(quiet_trainer, tmp_path / "stopped", SigtermAt(4), make_model=make)  # phase 2
    last = tmp_path / "stopped/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed, _, lrs = fit(
        quiet_trainer, tmp_path / "stopped", ckpt_path=str(last), init_seed=99, make_model=make
    )
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert lrs.lrs == {s: v for s, v in whole_lrs.lrs.items() if s >= 4}


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_gives_the_same_logits(name):
    batch = images(4).tensors[0]
    plain = timm_task(name, Full()).model.eval()
    nhwc = timm_task(name, Full(), channels_last=True).model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(nhwc(batch), plain(batch), atol=1e-5, rtol=1e-4)


def test_a_wrong_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"convnxt_atto.*convnext_atto.*timm.list_models"):
        backbone_spec("convnxt_atto", None, "timm")
    with pytest.raises(ValueError, match=r"'nope' is not a pretrained tag.*d2_in1k"):
        backbone_spec("convnext_atto", "nope", "timm")


def test_weights_come_from_files_and_the_hugging_face_hub_and_its_cache(tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = create_backbone("resnet10t", None, "timm", SIZE).model
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    torch.save(source.state_dict(), tmp_path / "model.pth")
    for file in ("model.safetensors", "model.pth"):
        loaded = create_backbone("resnet10t", str(tmp_path / file), "timm", SIZE).model
        for key, value in source.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key

    broken = dict(source.state_dict(), **{"conv1.0.weight": torch.zeros(24, 3, 5, 5)})
    broken.pop("layer4.0.bn1.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"layer4.0.bn1.weight.*conv1.0.weight: file \(24, 3"):
        create_backbone("resnet10t", str(tmp_path / "broken.pth"), "timm", SIZE)

    # Named weights: downloaded by huggingface_hub (from a loopback hub) into its cache, then
    # found there offline; with an empty cache, offline, the error says what to place where.
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with serve_handler(hub_for("timm/resnet10t.c3_in1k", save(source.state_dict()))) as endpoint:
        monkeypatch.setattr(hub, "ENDPOINT", endpoint)
        monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + HUB_URL_PATH)
        downloaded = create_backbone("resnet10t", "pretrained", "timm", SIZE).model
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    cached = create_backbone("resnet10t", "c3_in1k", "timm", SIZE).model
    for model in (downloaded, cached):
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as missing:
        create_backbone("resnet10t", "pretrained", "timm", SIZE)
    message = str(missing.value)
    assert "model.safetensors of timm/resnet10t.c3_in1k" in message
    assert str(tmp_path / "empty") in message and "HF_HOME" in message


HUB_URL_PATH = "/{repo_id}/resolve/{revision}/{filename}"


def hub_for(repo: str, weights: bytes) -> type[BaseHTTPRequestHandler]:
    """A handler that answers as the Hugging Face hub does for one file,
    `<repo>/resolve/main/model.safetensors`, with its commit and ETag headers."""

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            found = self.path == f"/{repo}/resolve/main/model.safetensors"
            self.send_response(200 if found else 404)
            self.send_header("X-Repo-Commit", "c" * 40)
            self.send_header("ETag", f'"{hashlib.sha256(weights).hexdigest()}"')
            self.send_header("Content-Length", str(len(weights) if found else 0))
            self.end_headers()

        def do_GET(self) -> None:
            self.do_HEAD()
            if self.path == f"/{repo}/resolve/main/model.safetensors":
                self.wfile.write(weights)

        def log_message(self, *args: object) -> None:
            pass

    return Hub


# A ViT-Tiny at 32 px (2 x 2 patches) with layer decay, random init, on the tiny Fashion-MNIST.
TINY_VIT = [
    *TINY,
    "model=vit_small",
    "model.name=vit_tiny_patch16_224",
    "model.weights=null",
    "finetune.layer_decay=0.75",
    "data.image_size=32",
    "logger=none",
]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, fmnist_root) -> Path:
    """A tiny ViT trained at 32 px through the composed config: two_phase, the head first on
    cached features."""
    out = tmp_path_factory.mktemp("vit") / "run"
    overrides = [*TINY_VIT, *offline_fmnist(fmnist_root), "augment=none"]
    run(compose_config("train", [*overrides, "finetune.cache_features=auto"], out))
    return out


def test_a_vit_checkpoint_carries_its_preprocessing_into_predict_export_and_new_runs(
    vit_run, tmp_path
):
    ckpt = vit_run / "checkpoints/best.ckpt"
    trained = load_trained(ckpt)
    assert trained.preprocessing.input_size == SIZE
    assert trained.preprocessing.mean == (0.5, 0.5, 0.5)  # the weights' pretrained_cfg
    assert trained.backbone.patch_embed.grid_size == (2, 2)

    onnx_path = export_model(trained, ckpt, "onnx", tmp_path / "onnx", parity_images=32)
    exported = OnnxModel(onnx_path)
    batch = torch.randn(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(exported(batch), trained(batch), atol=1e-4, rtol=1e-4)

    # The checkpoint as weights of a run at 64 px: the position embedding is resampled.
    backbone = create_backbone("vit_tiny_patch16_224", str(ckpt), "timm", input_size=64)
    assert backbone.model.patch_embed.grid_size == (4, 4)
    blocks = trained.backbone.blocks.state_dict()
    assert all(torch.equal(v, backbone.model.blocks.state_dict()[k]) for k, v in blocks.items())
    with pytest.raises(WeightsError, match="checkpoint of model.name=vit_tiny_patch16_224"):
        create_backbone("convnext_atto", str(ckpt), "timm", input_size=SIZE)


def test_image_size_auto_takes_the_weights_native_size(fmnist_root, tmp_path):
    overrides = ["model=timm", "model.name=resnet10t", "data.image_size=auto"]
    cfg = compose_config("train", [*overrides, *offline_fmnist(fmnist_root)], tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    assert datamodule.preprocessing.input_size == 176  # resnet10t.c3_in1k's pretrained_cfg
    assert backbone_spec("resnet10t", "pretrained", "timm").input_size == 176
