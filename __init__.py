"""comfyui-finetune: fine-tune Stable Diffusion inside ComfyUI (V3 extension entry point).

Importing this file must stay free of ComfyUI imports: pytest imports it as the repo root's
package when collecting tests, with or without ComfyUI installed.
"""

# The web extension (run panel, loss chart) served by ComfyUI.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """Called by ComfyUI's custom-node loader; returns the pack's ComfyExtension.

    There is deliberately no NODE_CLASS_MAPPINGS: the loader ignores comfy_entrypoint when it exists.
    """
    from .nodes.extension import FinetuneExtension

    return FinetuneExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
