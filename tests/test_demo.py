"""The demo end to end (fewer steps): tiny checkpoint, LoRA run, loss curve and checkpoint strip."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageChops

from trainer.demo import run_demo


@pytest.mark.slow
def test_demo_writes_the_run_the_loss_curve_and_the_strip(tmp_path):
    result = run_demo(out_dir=tmp_path / "demo", steps=4, checkpoint_every=2)
    assert result.ok, result.message
    assert [p.name for p in result.checkpoints] == [
        "demo-step00002.safetensors",
        "demo-step00004.safetensors",
    ]
    assert (tmp_path / "demo" / "model" / "tiny-sd15.safetensors").is_file()
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["status"]["state"] == "finished"
    assert run["config"]["dataset"]["parts"][0]["policy"]["shuffle"] is True
    assert run["config"]["dataset"]["parts"][0]["policy"]["keep_tokens"] == 1
    assert sorted(p.name for p in (result.run_dir / "samples").iterdir()) == [
        "step00002-0.png",
        "step00004-0.png",
    ]
    assert Image.open(result.loss_png).size == (800, 400)

    strip = Image.open(result.sweep_png).convert("RGB")
    assert strip.width > 3 * 64 and strip.height > 64
    # The 64 px renders sit in a row: base, step 2, step 4. Training changed the picture.
    tiles = _tiles(strip, 3)
    assert len(tiles) == 3
    assert ImageChops.difference(tiles[0], tiles[2]).getbbox() is not None
    text = result.describe()
    assert text.startswith("demo finished: finished 4 steps")
    assert f"checkpoint strip: {result.sweep_png}" in text


def _tiles(strip: Image.Image, n: int) -> list[Image.Image]:
    """Cut the ``n`` 64x64 renders out of the strip: the columns that are not background."""
    bg = strip.getpixel((0, 0))
    row = strip.height - 8 - 32  # a row through the renders (bottom padding 8, renders 64 high)
    xs = [x for x in range(strip.width) if strip.getpixel((x, row)) != bg]
    starts = [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x - 1]
    return [strip.crop((x, row - 16, x + 64, row + 16)) for x in starts[:n]]
