"""What an exported model carries about itself, so it can be used without its checkpoint.

Every exported file holds these as string key/value pairs (ONNX `metadata_props`, the
`extra_files` of a .pt2 archive): the class names, the Preprocessing, the Postprocessing, the
input layout, thaw's version and the checkpoint it came from (by basename and SHA-256, which
tell it apart without revealing where it was). A third party can rebuild the preprocessing from
them alone; the values are JSON where they are not plain strings.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PureWindowsPath

from thaw import __version__
from thaw.errors import UserError
from thaw.postprocess import Postprocessing, split_legacy_preprocessing
from thaw.preprocess import Preprocessing

# The input the exported graph takes, NCHW RGB of Preprocessing.input_size square:
FLOAT_INPUT = "float32_normalized"  # resized, cropped, scaled to [0, 1] and normalised
UINT8_INPUT = "uint8_rgb"  # resized and cropped only: the graph scales and normalises
INPUT_LAYOUTS = (FLOAT_INPUT, UINT8_INPUT)
_PREFIX = "thaw."


@dataclass(frozen=True)
class ExportMetadata:
    classes: list[str]
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    input_layout: str
    # thaw.checkpoint.file_identity of the checkpoint: {"file": basename, "sha256": hex}. A path
    # (what files exported before the digest hold) is kept as its basename alone.
    source_checkpoint: Mapping[str, str] | str
    thaw_version: str = __version__

    def __post_init__(self) -> None:
        if self.input_layout not in INPUT_LAYOUTS:
            raise UserError(
                f"input_layout must be one of {list(INPUT_LAYOUTS)}, got {self.input_layout!r}"
            )
        source = self.source_checkpoint
        if isinstance(source, str):  # either separator: the file may come from another system
            source = {"file": PureWindowsPath(source).name}
        object.__setattr__(self, "source_checkpoint", dict(source))

    @classmethod
    def keys(cls) -> list[str]:
        """The names `to_strings` writes (a .pt2 archive returns only the extra files asked for)."""
        return [_PREFIX + field.name for field in dataclasses.fields(cls)]

    def to_strings(self) -> dict[str, str]:
        """The metadata as `thaw.*` string pairs."""
        values = {
            "classes": json.dumps(self.classes),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "postprocessing": json.dumps(self.postprocessing.to_dict()),
            "input_layout": self.input_layout,
            "source_checkpoint": json.dumps(self.source_checkpoint),
            "thaw_version": self.thaw_version,
        }
        return {_PREFIX + key: value for key, value in values.items()}

    @classmethod
    def from_strings(cls, pairs: Mapping[str, str], source: str) -> ExportMetadata:
        """Read what `to_strings` wrote; `source` names the file in the error for one that has
        no thaw metadata. A file exported before the postprocessing had its own entry keeps
        the temperature in its preprocessing (an empty entry: a .pt2 asked for one)."""
        try:
            preprocessing, postprocessing = split_legacy_preprocessing(
                json.loads(pairs[_PREFIX + "preprocessing"])
            )
            if pairs.get(_PREFIX + "postprocessing"):
                postprocessing = json.loads(pairs[_PREFIX + "postprocessing"])
            return cls(
                classes=list(json.loads(pairs[_PREFIX + "classes"])),
                preprocessing=Preprocessing.from_dict(preprocessing),
                postprocessing=Postprocessing.from_dict(postprocessing),
                input_layout=pairs[_PREFIX + "input_layout"],
                source_checkpoint=_source(pairs[_PREFIX + "source_checkpoint"]),
                thaw_version=pairs[_PREFIX + "thaw_version"],
            )
        except KeyError as err:
            raise UserError(
                f"{source} has no thaw metadata ({err.args[0]} is missing): export it with "
                "thaw-export, which writes the classes and preprocessing into the file"
            ) from None
        except (TypeError, ValueError) as err:
            raise UserError(
                f"{source} holds thaw metadata that cannot be read ({err}): export it again "
                "with thaw-export"
            ) from err


def _source(text: str) -> Mapping[str, str] | str:
    """The stored source checkpoint: its identity (JSON), or the path an older file holds."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text
