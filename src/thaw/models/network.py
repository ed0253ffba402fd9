"""The trained classifier as a plain nn.Module: what every consumer loads, and training wraps.

Like a timm model that carries its `pretrained_cfg`, it carries what using it needs: the class
names, the Preprocessing its inputs get, the Postprocessing its logits get, and the composed
config of the run that made it. The training task (thaw.models.task) holds one; predict, export
and serve load one (thaw.models.builder.load_trained) without importing any training code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from thaw.errors import UserError
from thaw.models.backbones import HEAD, Backbone
from thaw.models.layer_groups import LayerGroup, build_layer_groups, single_group
from thaw.openset.scores import OpenSetScore
from thaw.postprocess import Postprocessing, Rejection
from thaw.preprocess import Preprocessing


class ImageClassifier(nn.Module):
    """Backbone, then a dropout and a linear head: images (B, C, H, W) -> logits (B, classes).

    Its parameters are organised in layer groups, backbone stages lowest first, the head last:
    the unit of freezing and of learning rates in training."""

    def __init__(
        self,
        backbone: Backbone,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        postprocessing: Postprocessing,
        head_dropout: float,
        config: dict[str, Any],
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if len(classes) < 2:
            raise UserError(
                f"a classifier needs at least 2 classes, got {list(classes)}: name two or more "
                "in data.classes, or give the data more class folders"
            )
        self.backbone = backbone.model
        self.backbone_blocks = backbone.blocks
        self.backbone_groups = backbone.groups  # stage -> parameter names, lowest first
        self.no_weight_decay = backbone.no_weight_decay
        self.head = nn.Sequential(
            nn.Dropout(head_dropout), nn.Linear(backbone.feature_dim, len(classes))
        )
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.feature_dim = backbone.feature_dim
        self.postprocessing = postprocessing
        # The score of the rejection rule, with what it needs as buffers (None without a rule).
        self.rejection: OpenSetScore | None = None
        if postprocessing.rejection is not None:
            self.rejection = self.new_score(postprocessing.rejection)
        self.config = config  # the composed config of the run that trained it
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of images (B, C, H, W), or of backbone features (B, D) that a FeatureCache
        computed once while the backbone was frozen."""
        return self.head(inputs if inputs.ndim == 2 else self.features(inputs))

    def scored(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and the rejection rule's score (B,) of images, from one pass
        through the backbone; the model must have a rule."""
        if self.rejection is None:
            raise ValueError("this model has no rejection rule to score with")
        features = self.features(images)
        logits = self.head(features)
        return logits, self.rejection(features, logits, self.postprocessing.temperature)

    def new_score(self, rule: Rejection) -> OpenSetScore:
        """An empty score module for `rule`, shaped for this model, to fit or to load."""
        return OpenSetScore(rule.score, self.feature_dim, len(self.classes), rule.bank_size, rule.k)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (B, D)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def layer_groups(self) -> dict[str, LayerGroup]:
        """Backbone stages lowest first, then the head."""
        groups = build_layer_groups(self.backbone, self.backbone_blocks, self.no_weight_decay)
        groups[HEAD] = single_group(self.head, HEAD)
        return groups

    def record(self) -> dict[str, Any]:
        """What a checkpoint carries besides the weights (thaw.checkpoint.RunRecord's fields)."""
        return {
            "config": self.config,
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "postprocessing": self.postprocessing.to_dict(),
        }
