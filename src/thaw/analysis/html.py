"""report.html: the report as one self-contained page (images embedded, no outside requests)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
h1 { font-size: 1.5rem; }
h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { padding: .2rem .6rem; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th[data-sort] { cursor: pointer; user-select: none; } th[data-sort]:hover { color: #27a; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; }
.card { background: #f5f7fa; border-radius: 6px; padding: .6rem 1rem; }
.card b { display: block; font-size: 1.4rem; }
.grid { display: flex; flex-wrap: wrap; gap: .8rem; }
figure { margin: 0; text-align: center; font-size: .8rem; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
figure img.wide { width: auto; height: auto; max-width: 100%; image-rendering: auto; }
table.kv td { text-align: left; }
.pairs { display: flex; flex-wrap: wrap; gap: .5rem 2rem; }
.pairs h3 { font-size: .95rem; margin: .4rem 0; }
.muted { color: #666; }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable th[data-sort]").forEach((th, column) => {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0];
    const up = th.dataset.dir !== "asc";
    th.dataset.dir = up ? "asc" : "desc";
    const key = (row) => row.cells[column].dataset.value ?? row.cells[column].textContent;
    const rows = [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      const order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return up ? order : -order;
    });
    body.replaceChildren(...rows);
  });
});
"""


def png_bytes(picture: Image.Image | torch.Tensor) -> bytes:
    """A PIL image, or a uint8 (3, H, W) tensor, as PNG bytes."""
    if isinstance(picture, torch.Tensor):
        picture = Image.fromarray(picture.permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI, for an <img> that needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render(report: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The page for `report` (report.json's content); `images` maps names used in the report
    (confusion, reliability, and one per example) to PNG bytes."""
    e = html.escape
    summary, metrics, calibration = report["summary"], report["metrics"], report["calibration"]
    size = report["model_size"]

    def picture(name: str, caption: str, css: str = "") -> str:
        attrs = f' class="{css}"' if css else ""
        return (
            f'<figure><img{attrs} src="{data_uri(images[name])}" alt="{e(caption)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    cards = [("top-1 accuracy", f"{metrics['acc']:.4f}")]
    if "acc_top5" in metrics:
        cards.append(("top-5 accuracy", f"{metrics['acc_top5']:.4f}"))
    cards.append(("macro F1", f"{metrics['f1_macro']:.4f}"))
    cards.append(("test images", str(report["test_images"])))
    headline = "".join(f'<div class="card">{e(k)}<b>{v}</b></div>' for k, v in cards)

    config_rows = "".join(
        f"<tr><td>{e(k.replace('_', ' '))}</td><td>{e(str(v))}</td></tr>"
        for k, v in summary.items()
    )

    per_class_rows = "".join(
        f"<tr><td>{e(row['class'])}</td><td>{row['precision']:.3f}</td>"
        f"<td>{row['recall']:.3f}</td><td>{row['f1']:.3f}</td><td>{row['support']}</td></tr>"
        for row in report["per_class"]
    )
    headers = "".join(
        f'<th data-sort="{h}">{h}</th>' for h in ("class", "precision", "recall", "F1", "support")
    )

    pairs = []
    for pair in report["most_confused"]:
        examples = "".join(
            picture(f"confused_{pair['true_index']}_{pair['predicted_index']}_{i}", f"#{index}")
            for i, index in enumerate(pair["examples"])
        )
        pairs.append(
            f"<div><h3>{e(pair['true'])} taken for {e(pair['predicted'])}: {pair['count']}</h3>"
            f'<div class="grid">{examples}</div></div>'
        )
    confused = f'<div class="pairs">{"".join(pairs)}</div>' if pairs else "<p>No mistakes.</p>"

    losses = "".join(
        picture(
            f"top_loss_{i}",
            f"{e(item['true'])} → {e(item['predicted'])} {item['prob']:.2f}",
        )
        for i, item in enumerate(report["top_losses"])
    )
    gradcam = "".join(
        picture(f"gradcam_{i}", f"{e(item['class'])} {item['prob']:.2f}")
        for i, item in enumerate(report["gradcam"]["correct"])
    )

    t = calibration["temperature"]
    fitted = "fitted on the validation split" if t != 1.0 else "none fitted (calibrate=false?)"
    calibration_rows = (
        f"<tr><td>ECE (15 bins)</td><td>{calibration['ece']:.4f}</td>"
        f"<td>{calibration['ece_calibrated']:.4f}</td></tr>"
        f"<tr><td>NLL</td><td>{calibration['nll']:.4f}</td>"
        f"<td>{calibration['nll_calibrated']:.4f}</td></tr>"
    )
    flops = size["flops_per_image"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>thaw report: {e(summary["model"])}</title>
<style>{STYLE}</style></head><body>
<h1>Evaluation report: {e(summary["model"])} on {e(summary["data"])}</h1>
<section id="summary"><div class="cards">{headline}</div>
<table class="kv">{config_rows}</table></section>

<section id="per-class"><h2>Per class</h2>
<p class="muted">Sorted by F1, weakest first; click a header to sort.</p>
<table class="sortable"><thead><tr>{headers}</tr></thead><tbody>{per_class_rows}</tbody></table>
</section>

<section id="confusion"><h2>Confusion matrix</h2>
{picture("confusion", "counts and row-normalised shares; rows are the true class", "wide")}
</section>

<section id="confused-pairs"><h2>Most-confused pairs</h2>{confused}</section>

<section id="top-losses"><h2>Top losses</h2>
<p class="muted">The test images the model is most confidently wrong about: true → predicted,
its probability, with the Grad-CAM map of the predicted class.</p>
<div class="grid">{losses}</div></section>

<section id="gradcam"><h2>Grad-CAM on correct predictions</h2>
<p class="muted">One correct image per class (up to {report["gradcam"]["max_classes"]} classes),
the map of its class from layer <code>{e(report["gradcam"]["layer"])}</code>.</p>
<div class="grid">{gradcam}</div></section>

<section id="calibration"><h2>Calibration</h2>
<p>Temperature {t:.3f}: {fitted}.</p>
<table><thead><tr><th></th><th>before</th><th>after temperature scaling</th></tr></thead>
<tbody>{calibration_rows}</tbody></table>
{picture("reliability", "reliability diagram", "wide")}</section>

<section id="model-size"><h2>Model size</h2>
<table class="kv"><tr><td>parameters</td><td>{size["parameters"]:,}</td></tr>
<tr><td>size</td><td>{size["megabytes"]:.2f} MB</td></tr>
<tr><td>FLOPs per image</td><td>{flops / 1e9:.3f} G ({size["input_size"]} px)</td></tr></table>
</section>
<script>{SORT_SCRIPT}</script>
</body></html>
"""
