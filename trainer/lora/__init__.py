"""LoRA for the trainer: which layers, putting peft LoRA layers in, and files ComfyUI loads.

- :mod:`.targets`  -- ``lora_targets`` presets -> exact module names.
- :mod:`.inject`   -- add / remove / merge LoRA layers (fp32 weights, seeded init).
- :mod:`.keys`     -- file key names per arch (kohya ``lora_unet_``/``lora_te*_``; SD3 diffusers names, scale folded).
- :mod:`.io`       -- collect, save (atomic safetensors) and load LoRA files.
- :mod:`.metadata` -- kohya ``ss_*`` and ``modelspec.*`` metadata.
"""

from .inject import add_lora, inject_lora, lora_layers, lora_parameters, merge_lora, remove_lora
from .io import (
    LoadReport,
    LoraMismatchError,
    addnet_hash,
    load_lora,
    lora_state_dict,
    part_state_dict,
    read_lora,
    save_lora,
)
from .keys import (
    KeyStyle,
    PartLayout,
    canonical_module_name,
    file_layout,
    folds_scale,
    from_file_keys,
    kohya_to_peft,
    legacy_layouts,
    peft_to_kohya,
    to_file_keys,
)
from .metadata import file_sha256, kohya_metadata, legacy_model_hash
from .targets import parse_preset, target_modules

__all__ = [
    "KeyStyle",
    "LoadReport",
    "LoraMismatchError",
    "PartLayout",
    "add_lora",
    "addnet_hash",
    "canonical_module_name",
    "file_layout",
    "file_sha256",
    "folds_scale",
    "from_file_keys",
    "inject_lora",
    "kohya_metadata",
    "kohya_to_peft",
    "legacy_layouts",
    "legacy_model_hash",
    "load_lora",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "parse_preset",
    "part_state_dict",
    "peft_to_kohya",
    "read_lora",
    "remove_lora",
    "save_lora",
    "target_modules",
    "to_file_keys",
]
