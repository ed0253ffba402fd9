"""A review queue as a person works through it: a gallery page (worst or most useful first) and a
Label Studio import file whose tasks carry thaw's answer as a pre-annotation, so a labelling team
reviews it in the tool it already runs.

Label Studio's import format is a JSON list of tasks, `{"data": {"image": ...}, "predictions":
[{"result": [{"from_name", "to_name", "type": "choices", "value": {"choices": [label]}}],
"score"}]}`; `label_studio.xml` beside it is the labelling interface those names refer to (paste
it into the project's Labeling Interface). Image files are given as Label Studio local-files
URLs relative to the data root (serve them with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true
and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<that root>); in-memory images are embedded as PNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import torch
from PIL import Image

from thaw.analysis.html import data_uri, png_bytes, render_page
from thaw.data.images import load_image

LABEL_STUDIO_TASKS = "label_studio.json"
LABEL_STUDIO_CONFIG = "label_studio.xml"
FROM_NAME, TO_NAME = "label", "image"  # the names label_studio.xml gives its Choices and Image
LOCAL_FILES = "/data/local-files/?d="
THUMBNAIL = 96  # px, the longer side of a gallery picture
SHOWN = 500  # the gallery shows the first this many; the CSV and the JSON hold them all


@dataclass(frozen=True)
class Queued:
    """One image of a queue: `key` names it in CSVs (a file's path, or an in-memory image's
    index), `picture` is what to show (the file, or the uint8 (C, H, W) image); `label` is what
    thaw suggests, with probability `prob`; `score` is why it is queued (a label quality, or an
    acquisition score); `given` is the label it has, where it has one."""

    key: Path | int
    picture: Path | torch.Tensor
    label: str
    prob: float
    score: float
    given: str | None = None

    @property
    def column(self) -> str:
        """The CSV column `key` goes in: "path" or "index"."""
        return "index" if isinstance(self.key, int) else "path"

    def image(self) -> Image.Image:
        if isinstance(self.picture, torch.Tensor):
            array = self.picture.permute(1, 2, 0).squeeze(-1).numpy()
            return Image.fromarray(array)
        return load_image(self.picture, THUMBNAIL)


def write_gallery(path: Path, title: str, note: str, queue: Sequence[Queued], score: str) -> None:
    """`path`: a self-contained page of thumbnails in queue order, each with its rank, its given
    label (where it has one) -> the suggested one, the probability and `score` (the score's
    name). Shows the first SHOWN."""
    tiles = []
    for rank, item in enumerate(queue[:SHOWN], start=1):
        picture = item.image()
        picture.thumbnail((THUMBNAIL, THUMBNAIL))
        name = item.key.name if isinstance(item.key, Path) else f"index {item.key}"
        tiles.append(
            {
                "rank": rank,
                "name": name,
                "uri": data_uri(png_bytes(picture.convert("RGB"))),
                "given": item.given,
                "label": item.label,
                "prob": item.prob,
                "score": item.score,
            }
        )
    page = render_page(
        "gallery.html.j2", title=title, note=note, tiles=tiles, total=len(queue), score=score
    )
    path.write_text(page, encoding="utf-8")


def write_label_studio(
    folder: Path, queue: Sequence[Queued], classes: Sequence[str], root: Path | None
) -> Path:
    """label_studio.json (the tasks, in queue order, the suggestion as a prediction) and
    label_studio.xml (the interface with every class as a choice) in `folder`; returns the
    tasks' file. `root`: the folder Label Studio serves local files from (the data root)."""
    tasks = []
    for rank, item in enumerate(queue, start=1):
        data: dict[str, object] = {"image": _image_url(item, root), item.column: _key(item)}
        data |= {"rank": rank, "score": item.score}
        if item.given is not None:
            data["given"] = item.given
        result = {
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": [item.label]},
        }
        tasks.append(
            {
                "data": data,
                "predictions": [{"model_version": "thaw", "score": item.prob, "result": [result]}],
            }
        )
    path = folder / LABEL_STUDIO_TASKS
    path.write_text(json.dumps(tasks, indent=1), encoding="utf-8")
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    (folder / LABEL_STUDIO_CONFIG).write_text(
        f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInLine="true">\n'
        f"{choices}\n  </Choices>\n</View>\n",
        encoding="utf-8",
    )
    return path


def _key(item: Queued) -> str | int:
    return item.key if isinstance(item.key, int) else str(item.key)


def _image_url(item: Queued, root: Path | None) -> str:
    """A file as a local-files URL relative to `root` (from / where it lies outside), an
    in-memory image as a PNG data URI."""
    if not isinstance(item.picture, Path):
        return data_uri(png_bytes(item.image().convert("RGB")))
    file = item.picture.resolve()
    base = root.resolve() if root is not None else None
    if base is not None and file.is_relative_to(base):
        relative = file.relative_to(base).as_posix()
    else:
        relative = file.as_posix().lstrip("/")
    return LOCAL_FILES + quote(relative, safe="/" + os.sep)
