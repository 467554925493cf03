"""Every kind of file the pack writes, loaded by diffusers 0.42 (a dependency, so this runs in CI).

The files and the measures are described in ``interop_files.py``; ComfyUI's side of the same
table is ``test_comfy_interop.py`` (real host). Per file kind:

- LoRA (SD1.5/SDXL/SD3, with and without text encoders, rank 8 / alpha 4): the pipeline's own
  ``load_lora_weights`` applies every module of the file and ignores no key, nothing is logged
  about unused keys, after ``fuse_lora()`` every weight moved by exactly (alpha/rank)·up·down of
  the file (so the scale is kept: for SD3 it lives in lora_up), that update is the trained
  model's own (up to the fp16 rounding of the file), and the denoiser's output changed.
- Full fine-tune (the denoiser file): ``from_single_file`` reads every weight bit for bit.

Run with ``-s`` to see the table::

    .venv/bin/python -m pytest -q -s tests/test_interop_diffusers.py
"""

from __future__ import annotations

import pytest
import torch
from interop_files import ALPHA, KINDS, RANK, diffusers_full_report, diffusers_lora_report, table, write_file

# |ΔW - (alpha/rank)·up·down|: fp32 rounding of W + ΔW (weights and updates are < 1).
MAX_DELTA_ERROR = 1e-6
# |file update - trained update|: the file stores lora_down/lora_up in fp16.
MAX_TRAINED_ERROR = 2e-5

_ROWS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(kind):
        if kind.name not in cache:
            work = tmp_path_factory.mktemp(kind.name.replace(" ", "_").replace("+", ""))
            cache[kind.name] = {"work": work, **write_file(kind, work)}
        return cache[kind.name]

    return get


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name.replace(" ", "-"))
def test_diffusers_loads_the_file_exactly(kind, written):
    ours = written(kind)
    assert ours["state"] == "finished", ours["message"]
    if kind.method == "lora":
        meta = ours["metadata"]
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))
        assert meta["ss_network_module"] == "networks.lora"
        report = diffusers_lora_report(kind, ours["path"], ours["trained"])
        assert report["ignored_detail"] == []
        assert report["not_in_file"] == []
        assert report["applied"] == report["modules"] > 0
        assert (report["text_encoder_modules"] > 0) == kind.text_encoders
        assert report["max_delta_error"] <= MAX_DELTA_ERROR
        assert report["max_trained_error"] <= MAX_TRAINED_ERROR
        assert report["largest_delta"] > 100 * MAX_TRAINED_ERROR  # the update is far above rounding
    else:
        report = diffusers_full_report(kind, ours["path"], ours["trained"], ours["work"])
        assert report["ignored_detail"] == []
        assert report["applied"] == report["modules"] > 0
        assert report["max_delta_error"] == 0.0
    assert report["output_change"] > 1e-3
    _ROWS[kind.name] = {"kind": kind.name, **report}


def test_sd3_files_of_earlier_versions_are_what_diffusers_refused(written):
    """Why SD3 files changed layout: ``transformer.*.alpha`` keys make diffusers refuse the file."""
    from interop_files import interop_bundle
    from safetensors.torch import load_file

    from trainer.models.pipelines import make_pipeline

    kind = next(k for k in KINDS if k.arch == "sd3" and k.method == "lora" and not k.text_encoders)
    ours = written(kind)
    tensors = load_file(ours["path"])
    old = dict(tensors)
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            old[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(value.shape[0]))
    pipe = make_pipeline(interop_bundle("sd3"))
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(old)


def test_print_the_table():
    """Prints the file kind x diffusers table (run with -s); every kind above was measured."""
    assert sorted(_ROWS) == sorted(k.name for k in KINDS)
    print("\n" + table([_ROWS[k.name] for k in KINDS]))
