"""The model layer: loading base models offline, tiny test models, prompt encoding, format conversion.

Modules (import them directly; importing this package loads no ML library; it only quiets one
diffusers warning, see below):
    bundle     ModelBundle, what the trainer works on
    load       load_base_model (diffusers folders and single files)
    detect     detect_arch / inspect_checkpoint from tensor names
    tiny       tiny_bundle, save_tiny_checkpoint
    text       encode_prompts, sdxl_time_ids
    convert    diffusers -> original layout, save_diffusion_model
    pipelines  make_pipeline, render (validation images)
    errors     ModelLoadError
"""

import logging


class _EmptyFp32ListFilter(logging.Filter):
    """Drops diffusers' warning that a model's modules "should be kept in float32: []".

    diffusers 0.42 logs it on every ``model.to(dtype)`` even when that list is empty (nothing
    is kept in fp32, so the cast is exact); the trainer casts on each load and move, and the
    warning would fill ComfyUI's console. A non-empty list still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())
