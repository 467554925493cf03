"""The model layer: loading base models offline, tiny test models, prompt encoding, format conversion.

Modules (import them directly; importing this package loads no ML library):
    bundle     ModelBundle, what the trainer works on
    load       load_base_model (diffusers folders and single files)
    detect     detect_arch / inspect_checkpoint from tensor names
    tiny       tiny_bundle, save_tiny_checkpoint
    text       encode_prompts, sdxl_time_ids
    convert    diffusers -> original layout, save_diffusion_model
    pipelines  make_pipeline, render (validation images)
    errors     ModelLoadError
"""
