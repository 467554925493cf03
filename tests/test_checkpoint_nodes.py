"""The checkpoint nodes' execute() without a server: Run Checkpoints on a run folder, Checkpoint
Sweep with the sampling functions of nodes/host.py replaced by fakes, Labeled Strip on a tensor.

Needs ComfyUI's ``comfy_api`` (set ``COMFYUI_PATH`` and run with ComfyUI's python); skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch
from comfy_server import NO_COMFY_API, comfy_api_available, import_pack
from safetensors.torch import save_file

if not comfy_api_available():
    pytest.skip(NO_COMFY_API, allow_module_level=True)

from trainer.checkpoints import fingerprint, list_checkpoints  # noqa: E402
from trainer.strip import compute_layout  # noqa: E402

nodes = import_pack("nodes.checkpoint_nodes")
host = import_pack("nodes.host")


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    out = tmp_path / "output"
    ckpts = out / "finetune" / "cats" / "checkpoints"
    ckpts.mkdir(parents=True)
    (out / "finetune" / "cats" / "run.json").write_text("{}")
    lora = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 1)}
    for name in ("cats-step00800.safetensors", "cats-step01600.safetensors", "cats.safetensors"):
        save_file(lora, ckpts / name)
    save_file({"input_blocks.0.0.weight": torch.zeros(1, 1)}, out / "finetune" / "full-step00100.safetensors")
    monkeypatch.setattr(host, "output_directory", lambda: out)
    monkeypatch.setattr(host, "folder_paths_for", lambda name: [])
    return out


def test_run_checkpoints_lists_the_chosen_run(output_dir):
    assert nodes.run_names() == ["cats"]
    result = nodes.RunCheckpoints.execute(
        run="cats", folder="", every_k=1, step_min=0, step_max=0, include_base=True
    )
    found, labels = result.result
    assert [c.label for c in found] == ["base", "step 800", "step 1600", "final"]
    assert labels == "base\nstep 800\nstep 1600\nfinal"
    only = nodes.RunCheckpoints.execute(
        run="(none)", folder="finetune/cats", every_k=1, step_min=900, step_max=0, include_base=False
    )
    assert [c.label for c in only[0]] == ["step 1600", "final"]


def test_run_checkpoints_fingerprint_follows_the_folder(output_dir):
    ckpts = output_dir / "finetune" / "cats" / "checkpoints"
    kwargs = {"run": "cats", "folder": "", "every_k": 1, "step_min": 0, "step_max": 0, "include_base": True}
    before = nodes.RunCheckpoints.fingerprint_inputs(**kwargs)
    assert before == fingerprint(ckpts)
    (ckpts / "cats-step02400.safetensors").write_bytes(b"new")
    assert nodes.RunCheckpoints.fingerprint_inputs(**kwargs) != before
    assert nodes.RunCheckpoints.fingerprint_inputs(**{**kwargs, "run": "(none)"}).startswith(
        "error: choose a run"
    )


@pytest.mark.parametrize(
    "run, folder, message",
    [
        ("(none)", "", "choose a run, connect a Train node's run, or type a folder of checkpoints"),
        ("dogs", "", "run: no run 'dogs' in "),
        ("../x", "", "run: '../x' may not contain '..'"),
        ("(none)", "../etc", "folder: '../etc' contains '..'"),
    ],
)
def test_run_checkpoints_errors_name_the_value(output_dir, run, folder, message):
    with pytest.raises(ValueError) as info:
        nodes.RunCheckpoints.execute(
            run=run, folder=folder, every_k=1, step_min=0, step_max=0, include_base=False
        )
    assert message in str(info.value)


class FakeHost:
    """Stands in for the sampling section of nodes/host.py and records what the sweep did."""

    def __init__(self, interrupt_after: int | None = None, *, denoiser_only_loras: bool = False):
        self.calls: list[tuple] = []
        self.encoded: list[tuple] = []
        self.denoiser_only_loras = denoiser_only_loras
        self.updates = 0
        self.checks = 0
        self.interrupt_after = interrupt_after

    def install(self, monkeypatch):
        fake = self

        class Bar:
            def __init__(self, total):
                fake.calls.append(("bar", total))

            def update(self, n):
                fake.updates += n

        def throw_if_interrupted():
            fake.checks += 1
            if fake.interrupt_after is not None and fake.checks > fake.interrupt_after:
                raise InterruptedError("cancelled")

        monkeypatch.setattr(host, "progress_bar", Bar)
        monkeypatch.setattr(host, "throw_if_interrupted", throw_if_interrupted)
        monkeypatch.setattr(host, "encode_text", self.encode)
        monkeypatch.setattr(host, "same_text_encoders", lambda clip, other: clip == other)
        monkeypatch.setattr(host, "apply_lora_file", self.apply_lora)
        monkeypatch.setattr(host, "load_diffusion_model_file", self.load_full)
        monkeypatch.setattr(host, "sample_image", self.sample)

    def encode(self, clip, text):
        self.encoded.append((clip, text))
        return clip, text

    def apply_lora(self, model, clip, path, *, strength_model, strength_clip):
        self.calls.append(("lora", path.name, strength_model, strength_clip))
        return f"{model}+{path.stem}", clip if self.denoiser_only_loras else f"{clip}+{path.stem}"

    def load_full(self, path):
        self.calls.append(("full", path.name))
        return f"full:{path.stem}"

    def sample(
        self, model, vae, positive, negative, *, seed, steps, cfg, sampler_name, scheduler, width, height
    ):
        self.calls.append(("render", model, positive[1], negative[1], seed))
        return torch.zeros(1, height, width, 3)


def test_sweep_renders_row_major_and_applies_each_lora_once(output_dir, monkeypatch):
    fake = FakeHost()
    fake.install(monkeypatch)
    full = output_dir / "finetune" / "full-step00100.safetensors"
    ckpts = list_checkpoints(
        output_dir / "finetune" / "cats" / "checkpoints", include_base=True, step_max=800
    )
    ckpts = [*ckpts, *list_checkpoints(full.parent)]
    assert [c.label for c in ckpts] == ["base", "step 800", "step 100"]
    out = nodes.CheckpointSweep.execute(
        model="M", clip="C", vae="V", checkpoints=ckpts, positive="a cat\n\n  a dog  \n", negative="blurry",
        seed=42, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=48, lora_strength=0.75,
    )  # fmt: skip
    images, labels, row_labels = out.result
    assert images.shape == (6, 48, 64, 3)
    assert labels == "base\nstep 800\nstep 100" and row_labels == "a cat\na dog"
    assert fake.calls == [
        ("bar", 6),
        ("render", "M", "a cat", "blurry", 42),
        ("render", "M", "a dog", "blurry", 42),
        ("lora", "cats-step00800.safetensors", 0.75, 0.75),
        ("render", "M+cats-step00800", "a cat", "blurry", 42),
        ("render", "M+cats-step00800", "a dog", "blurry", 42),
        ("full", "full-step00100.safetensors"),
        ("render", "full:full-step00100", "a cat", "blurry", 42),
        ("render", "full:full-step00100", "a dog", "blurry", 42),
    ]
    assert fake.updates == 6


@pytest.mark.parametrize("denoiser_only", [False, True])
def test_the_sweep_encodes_each_prompt_once_unless_a_lora_patches_the_text_encoders(
    output_dir, monkeypatch, denoiser_only
):
    fake = FakeHost(denoiser_only_loras=denoiser_only)
    fake.install(monkeypatch)
    full = output_dir / "finetune" / "full-step00100.safetensors"
    ckpts = list_checkpoints(
        output_dir / "finetune" / "cats" / "checkpoints", include_base=True, step_max=800
    )
    ckpts = [*ckpts, *list_checkpoints(full.parent)]
    nodes.CheckpointSweep.execute(
        model="M", clip="C", vae="V", checkpoints=ckpts, positive="a cat\na dog", negative="blurry",
        seed=42, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=48, lora_strength=1.0,
    )  # fmt: skip
    once = [("C", "blurry"), ("C", "a cat"), ("C", "a dog")]
    # A LoRA with text-encoder weights is encoded through its own patched CLIP; the base and the
    # full checkpoint (which keeps the CLIP) reuse the base encodings.
    patched = [("C+cats-step00800", "blurry"), ("C+cats-step00800", "a cat"), ("C+cats-step00800", "a dog")]
    assert fake.encoded == (once if denoiser_only else once + patched)
    renders = [c for c in fake.calls if c[0] == "render"]
    assert [(r[2], r[3]) for r in renders] == [("a cat", "blurry"), ("a dog", "blurry")] * 3


def test_sweep_row_major_order_of_images(output_dir, monkeypatch):
    fake = FakeHost()
    fake.install(monkeypatch)
    order = []

    def sample(model, vae, positive, negative, **kw):
        order.append((model, positive[1]))
        return torch.full((1, 8, 8, 3), float(len(order)))

    monkeypatch.setattr(host, "sample_image", sample)
    ckpts = list_checkpoints(output_dir / "finetune" / "cats" / "checkpoints")
    out = nodes.CheckpointSweep.execute(
        model="M", clip="C", vae="V", checkpoints=ckpts, positive="p1\np2", negative="",
        seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", width=8, height=8, lora_strength=1.0,
    )  # fmt: skip
    # rendered checkpoint by checkpoint (1..6), returned prompt by prompt
    assert [int(v) for v in out.result[0][:, 0, 0, 0]] == [1, 3, 5, 2, 4, 6]


def test_sweep_stops_when_cancelled_between_renders(output_dir, monkeypatch):
    fake = FakeHost(interrupt_after=2)
    fake.install(monkeypatch)
    ckpts = list_checkpoints(output_dir / "finetune" / "cats" / "checkpoints")
    with pytest.raises(InterruptedError):
        nodes.CheckpointSweep.execute(
            model="M", clip="C", vae="V", checkpoints=ckpts, positive="x", negative="",
            seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", width=8, height=8, lora_strength=1.0,
        )  # fmt: skip
    assert [c[0] for c in fake.calls].count("render") == 1


def test_sweep_refuses_folder_checkpoints(tmp_path, monkeypatch):
    FakeHost().install(monkeypatch)
    (tmp_path / "checkpoint-800").mkdir()
    ckpts = list_checkpoints(tmp_path)
    with pytest.raises(
        ValueError, match=r"step 800 \(checkpoint-800\) is a folder; the sweep loads single-file"
    ):
        nodes.CheckpointSweep.execute(
            model="M", clip="C", vae="V", checkpoints=ckpts, positive="x", negative="",
            seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", width=8, height=8, lora_strength=1.0,
        )  # fmt: skip


def test_labeled_strip_node_draws_tiles_in_order(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path))
    colours = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0)]
    images = torch.stack([torch.tensor(c).expand(32, 32, 3) for c in colours])
    out = nodes.LabeledStrip.execute(
        images=images, labels="base\nstep 800", row_labels="a cat\na dog", columns=0, label_height=0,
        font_size=0, background="#000000", text_color="#ffffff", title="", padding=4,
    )  # fmt: skip
    (strip,) = out.result
    layout = compute_layout([(32, 32)] * 4, ["base", "step 800"], row_labels=["a cat", "a dog"], padding=4)
    assert tuple(strip.shape) == (1, layout.size[1], layout.size[0], 3)
    for tile, colour in zip(layout.tiles, colours, strict=True):
        x, y = (tile.image_box[0] + tile.image_box[2]) // 2, (tile.image_box[1] + tile.image_box[3]) // 2
        assert tuple(strip[0, y, x].tolist()) == colour
    assert out.ui.as_dict()["images"][0]["type"] == "temp"
    assert len(list(tmp_path.glob("*.png"))) == 1
