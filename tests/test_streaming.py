"""data=streaming: litdata shards written by scripts/make_shards.py, streamed for training and
read by index for evaluation. Resume is in test_resume (the streaming case)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import FOLDER_CLASSES, FOLDER_SPLITS, TINY, load_script
from datamodules import make_datamodule
from thaw.config import compose_config
from thaw.data.augment.batch import BatchAugment
from thaw.data.resumable import StreamingLoader
from thaw.data.sources.imagefolder import ImageFolder
from thaw.data.sources.streaming import MANIFEST, StreamingSource
from thaw.errors import UserError
from thaw.preprocess import Preprocessing
from thaw.train import run

MEAN = STD = [0.5, 0.5, 0.5]
RAW = Preprocessing(input_size=28, mean=(0.0,) * 3, std=(1 / 255,) * 3)  # pixels, as floats


def test_make_shards_writes_the_planned_splits_with_the_cached_pixels(
    photo_folder, photo_shards, tmp_path
):
    """Every split in order: the manifest's labels are the samples' own, and each sample holds
    the pixels data.cache decodes for that file. Writing them left Ctrl-C's handler as it was
    (litdata.optimize installs its own)."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    manifest = json.loads((photo_shards / MANIFEST).read_text())
    folder = make_datamodule(
        ImageFolder(photo_folder), None, MEAN, STD, image_size=28, cache=str(tmp_path)
    )
    folder.setup()
    assert manifest["classes"] == folder.classes == sorted(FOLDER_CLASSES)
    assert manifest["side"] == 28 and not manifest["multilabel"]
    streamed = StreamingSource(str(photo_shards)).load()
    for split in ("train", "val", "test"):
        shards, files = getattr(streamed, split), getattr(folder, f"{split}_set")
        assert len(shards) == len(files) == FOLDER_SPLITS[split] * len(FOLDER_CLASSES)
        assert torch.equal(shards.labels, files.labels), split
        dataset = shards.images.dataset()
        assert [int(dataset[i]["label"]) for i in range(len(dataset))] == files.labels.tolist()
        pixels = torch.stack([shards.images[i] for i in range(len(shards))])
        assert torch.equal(pixels, folder.pixels[split].images), split


def streamed_epoch(source: StreamingSource, epoch: int = 0) -> list[torch.Tensor]:
    """One epoch of the training stream's raw pixels, batch by batch."""
    datamodule = make_datamodule(source, None, MEAN, STD, seed=3)
    datamodule.setup()
    loader = datamodule.train_dataloader()
    assert isinstance(loader, StreamingLoader) and datamodule.loader == "streaming"
    loader.transform = BatchAugment(None, RAW, train=True)
    loader.sampler.set_epoch(epoch)
    return [images for images, _ in loader]


def test_a_local_folder_read_as_a_remote_streams_the_same_batches(photo_shards, tmp_path):
    """`local:<folder>` goes through litdata's downloader and chunk cache, as s3:// does."""
    local = streamed_epoch(StreamingSource(str(photo_shards)))
    remote = StreamingSource(f"local:{photo_shards}", cache_dir=str(tmp_path / "chunks"))
    assert all(map(torch.equal, local, streamed_epoch(remote)))
    assert any((tmp_path / "chunks").rglob("*.bin"))  # the chunks were fetched, not read in place
    assert not all(map(torch.equal, local, streamed_epoch(StreamingSource(str(photo_shards)), 1)))


def _rank_stream(rank: int, shards: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        images = StreamingSource(shards).load().train.images
        labels = torch.zeros(len(images))
        loader = StreamingLoader(images, labels, BatchAugment(None, RAW, train=True), 0, 8, 0)
        batches = [batch.round().to(torch.uint8) for batch, _ in loader]  # the pixels again
        seen = [tuple(image.flatten().tolist()) for batch in batches for image in batch]
        Path(out, f"{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_each_ddp_rank_streams_its_own_part_of_the_training_split(photo_shards, tmp_path):
    """Two gloo processes: litdata splits the epoch between them, no image on both."""

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(
        _rank_stream, (str(photo_shards), port, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [set(map(tuple, json.loads((tmp_path / f"{r}.json").read_text()))) for r in (0, 1)]
    every = StreamingSource(str(photo_shards)).load().train.images
    whole = {tuple(image.flatten().tolist()) for image in every}
    # litdata evens the ranks out in whole batches (drop_last under DDP): 60 each, 56 streamed.
    assert len(ranks[0]) == len(ranks[1]) == 56
    assert not ranks[0] & ranks[1] and ranks[0] | ranks[1] <= whole


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"classes": ["Bag"]}, "data.classes: data=streaming trains on the splits"),
        ({"samples_per_class": 5}, "give these to make_shards.py"),
        ({"sampler": "balanced"}, "data.sampler=balanced: not available with data=streaming"),
        ({"normalize": "dataset"}, "data.normalize=dataset: not available"),
        ({"loader": "dataloader"}, "leave data.loader at auto"),
        ({"augment": {"policy": "trivialaugment"}}, "only runs per image"),
    ],
)
def test_streaming_refuses_what_would_replan_or_leave_its_path(photo_shards, values, message):
    augment = values.pop("augment", None)
    datamodule = make_datamodule(StreamingSource(str(photo_shards)), augment, MEAN, STD, **values)
    with pytest.raises(UserError, match=message):
        datamodule.setup()


def test_a_root_without_shards_and_make_shards_without_out_are_named(tmp_path):
    with pytest.raises(UserError, match=f"data.root={tmp_path}: no readable {MANIFEST}"):
        StreamingSource(str(tmp_path)).prepare()
    make_shards = load_script("make_shards")
    with pytest.raises(UserError, match="out= is required"):
        make_shards.main(["data=imagefolder", f"data.root={tmp_path}"])
    with pytest.raises(UserError, match="out=gs://b/p: shards are written to a folder or to s3"):
        make_shards.main(["data=imagefolder", f"data.root={tmp_path}", "out=gs://b/p"])


def test_a_frozen_backbone_trains_its_head_on_cached_features_of_the_shards(
    photo_shards, tmp_path, caplog
):
    """finetune=linear_probe augment=none: the features of the streamed split are computed
    once, by index, and served in the sampler's order."""
    overrides = ["data=streaming", f"data.root={photo_shards}", "data.batch_size=16"]
    overrides += ["finetune=linear_probe", "augment=none", "test=false"]
    with caplog.at_level(logging.INFO, logger="thaw.finetune.feature_cache"):
        metrics = run(compose_config("train", [*TINY, *overrides], tmp_path / "run"))
    for split, count in (("train", 120), ("val", 36)):
        assert f"Cached ({count}, 512) backbone features of the {split} set" in caplog.text
    assert metrics["val/acc_best"] > 1 / 3  # the head learnt something: three classes
