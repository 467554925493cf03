"""Render a workflow once per checkpoint through a running ComfyUI and lay the renders out in a strip.

This is ``python -m trainer sweep``: it needs no ComfyUI import, only its HTTP API. For each
checkpoint (and each prompt, one row per prompt) it copies an API-format workflow, points the
loader node at the checkpoint, queues it the way ComfyUI's own script examples do (websocket
first, then ``POST /prompt``, wait for ``executing`` with node null, read ``/history``, download
through ``/view``) and finally calls :func:`trainer.strip.labeled_strip`.

Only the standard library and ``websocket-client`` are used.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .checkpoints import CheckpointInfo, list_checkpoints
from .comfy_client import ComfyClient, SweepError
from .strip import labeled_strip

log = logging.getLogger("finetune")

#: Loader inputs tried, in order, when ``--input`` is not given.
LOADER_INPUTS = ("lora_name", "unet_name", "ckpt_name")
#: Inputs set to 0 for the "base" render on a LoRA loader (the LoRA then changes nothing).
STRENGTH_INPUTS = ("strength_model", "strength_clip")


# --------------------------------------------------------------------------------------------
# Workflow editing


def load_api_workflow(path: str | os.PathLike) -> dict[str, Any]:
    """Read an API-format workflow (``{"3": {"class_type": …, "inputs": …}, …}``).

    Raises:
        SweepError: the file is missing, not JSON, or a UI-format workflow.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"--workflow {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise SweepError(f"--workflow {str(path)!r} is not JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise SweepError(
            f"--workflow {str(path)!r} is a UI-format workflow (it has 'nodes' and 'links'); export it in "
            f"API format with 'Save (API)' (Workflow menu > Export (API)) and pass that file"
        )
    if (
        not isinstance(data, dict)
        or not data
        or not all(
            isinstance(v, dict) and "class_type" in v and isinstance(v.get("inputs"), dict)
            for v in data.values()
        )
    ):
        raise SweepError(
            f"--workflow {str(path)!r} is not an API-format workflow (an object of node ids, each with "
            f"'class_type' and 'inputs'); export it with 'Save (API)'"
        )
    return data


def _describe_nodes(workflow: dict[str, Any]) -> str:
    return ", ".join(f"{nid} ({node.get('class_type', '?')})" for nid, node in workflow.items())


def check_input(
    workflow: dict[str, Any], node_id: str, input_name: str | None, *, option: str = "--node"
) -> str:
    """Check ``node_id`` exists and has ``input_name`` (or guess a loader input); return the name.

    Raises:
        SweepError: listing the nodes that exist, or the node's inputs.
    """
    node = workflow.get(str(node_id))
    if node is None:
        raise SweepError(
            f"{option} {node_id!r} is not in the workflow; its nodes are: {_describe_nodes(workflow)}"
        )
    inputs = node["inputs"]
    if input_name is None:
        for candidate in LOADER_INPUTS:
            if candidate in inputs:
                return candidate
        raise SweepError(
            f"node {node_id} ({node['class_type']}) has none of the loader inputs {', '.join(LOADER_INPUTS)}; "
            f"pass --input with one of its inputs: {', '.join(inputs)}"
        )
    if input_name not in inputs:
        raise SweepError(
            f"node {node_id} ({node['class_type']}) has no input {input_name!r}; its inputs are: {', '.join(inputs)}"
        )
    return input_name


def comfy_name(checkpoint: CheckpointInfo, *, name_prefix: str = "") -> str:
    """The name ComfyUI's loader knows a checkpoint by: its file name under the model folder,
    with ``name_prefix`` (a sub-folder like ``finetune/my-lora/``) in front."""
    if checkpoint.path is None:
        raise ValueError("the base entry has no file name")
    return f"{name_prefix}{checkpoint.path.name}"


def workflow_for(
    workflow: dict[str, Any],
    checkpoint: CheckpointInfo,
    *,
    node: str,
    input_name: str,
    name_prefix: str = "",
    prompt: tuple[str, str, str] | None = None,
) -> dict[str, Any]:
    """A copy of ``workflow`` set up to render ``checkpoint``.

    Args:
        workflow: the API-format workflow (left unchanged).
        checkpoint: the checkpoint; the "base" entry keeps the workflow's own value and sets a LoRA
            loader's strengths to 0, so the render shows the model without the LoRA.
        node: the loader node's id.
        input_name: its input that takes the checkpoint name.
        name_prefix: see :func:`comfy_name`.
        prompt: (node id, input name, text) to set, or None.
    """
    wf = copy.deepcopy(workflow)
    inputs = wf[node]["inputs"]
    if checkpoint.is_base:
        for name in STRENGTH_INPUTS:
            if name in inputs:
                inputs[name] = 0.0
    else:
        inputs[input_name] = comfy_name(checkpoint, name_prefix=name_prefix)
    if prompt is not None:
        prompt_node, prompt_input, text = prompt
        wf[prompt_node]["inputs"][prompt_input] = text
    return wf


@dataclass
class SweepResult:
    """The renders, row by row (one row per prompt), and their labels."""

    images: list[Image.Image]
    labels: list[str]
    row_labels: list[str]


def sweep(
    client: ComfyClient,
    workflow: dict[str, Any],
    checkpoints: Sequence[CheckpointInfo],
    *,
    node: str,
    input_name: str | None = None,
    name_prefix: str = "",
    prompt_node: str | None = None,
    prompt_input: str = "text",
    prompts: Sequence[str] = (),
    output_node: str | None = None,
) -> SweepResult:
    """Render ``workflow`` with every checkpoint (and every prompt); the client must be connected.

    Returns:
        A :class:`SweepResult`: images row-major (prompt by prompt, checkpoints in order), one
        label per checkpoint, one row label per prompt (none without prompts).
    """
    if not checkpoints:
        raise SweepError("no checkpoints to sweep; check --checkpoints and the --step-min/--step-max range")
    input_name = check_input(workflow, node, input_name)
    if prompts and prompt_node is None:
        raise SweepError(
            "--prompt needs --prompt-node (the id of the text-encode node whose text it replaces)"
        )
    if prompt_node is not None:
        check_input(workflow, prompt_node, prompt_input, option="--prompt-node")
    if output_node is not None and str(output_node) not in workflow:
        raise SweepError(
            f"--output-node {output_node!r} is not in the workflow; its nodes are: {_describe_nodes(workflow)}"
        )
    rows: list[str | None] = list(prompts) or [None]
    images = []
    for r, text in enumerate(rows):
        for c, ckpt in enumerate(checkpoints):
            what = f"{ckpt.label}" + (f" / prompt {r + 1}" if text is not None else "")
            prompt = (
                (prompt_node, prompt_input, text) if text is not None and prompt_node is not None else None
            )
            wf = workflow_for(
                workflow, ckpt, node=node, input_name=input_name, name_prefix=name_prefix, prompt=prompt
            )
            log.info(
                "finetune: sweep %d/%d: %s", r * len(checkpoints) + c + 1, len(rows) * len(checkpoints), what
            )
            images.append(client.render(wf, output_node=output_node, what=what))
    return SweepResult(images, [c.label for c in checkpoints], list(prompts))


# --------------------------------------------------------------------------------------------
# CLI


def resolve_checkpoint_folder(value: str, *, output_dir: str | os.PathLike = "output") -> Path:
    """``--checkpoints``: a folder of checkpoints, a run folder (its ``checkpoints/``), or a run name
    looked up under ``<output_dir>/finetune/``."""
    path = Path(value)
    candidates = [path / "checkpoints", path, Path(output_dir) / "finetune" / value / "checkpoints"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise SweepError(
        f"--checkpoints {value!r} is neither a folder nor a run under {str(Path(output_dir) / 'finetune')!r}; "
        f"pass the run's checkpoints folder or set --output-dir to ComfyUI's output folder"
    )


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sweep`` subcommand's flags."""
    parser.add_argument("--server", default="127.0.0.1:8188", help="ComfyUI address (host:port or URL).")
    parser.add_argument("--workflow", required=True, help="API-format workflow JSON (ComfyUI: Save (API)).")
    parser.add_argument(
        "--checkpoints", required=True, help="Folder of checkpoints, a run folder, or a run name."
    )
    parser.add_argument(
        "--output-dir", default="output", help="ComfyUI's output folder, to find runs by name."
    )
    parser.add_argument(
        "--node", required=True, help="Id of the loader node in the workflow (LoraLoader, UNETLoader, …)."
    )
    parser.add_argument(
        "--input",
        default=None,
        help="The loader's input to set (default: lora_name, unet_name or ckpt_name).",
    )
    parser.add_argument(
        "--name-prefix",
        default="",
        help="Put in front of each file name, e.g. a sub-folder of models/loras/.",
    )
    parser.add_argument(
        "--prompt-node", default=None, help="Id of the text-encode node whose text --prompt replaces."
    )
    parser.add_argument("--prompt-input", default="text", help="That node's text input (default: text).")
    parser.add_argument(
        "--prompt", action="append", default=[], help="A prompt; repeat for one row per prompt."
    )
    parser.add_argument(
        "--output-node", default=None, help="Id of the node whose image is used (default: the first image)."
    )
    parser.add_argument(
        "--every-k", type=int, default=1, help="Use every k-th checkpoint (the newest always)."
    )
    parser.add_argument("--step-min", type=int, default=None, help="Skip checkpoints before this step.")
    parser.add_argument(
        "--step-max", type=int, default=None, help="Skip checkpoints after this step (and the final one)."
    )
    parser.add_argument(
        "--include-base",
        action="store_true",
        help="Add a 'base' render (LoRA strengths 0 / the workflow's own model).",
    )
    parser.add_argument("--title", default="", help="Title line over the strip.")
    parser.add_argument("--font-size", type=int, default=0, help="Label size in pixels (0 = automatic).")
    parser.add_argument("--columns", type=int, default=0, help="Tiles per row without prompts (0 = one row).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds to wait for one render.")
    parser.add_argument("--out", required=True, help="Where to write the strip (PNG).")


def run_sweep(args: argparse.Namespace) -> int:
    """Run ``python -m trainer sweep``; returns the exit code (0 ok, 1 sweep failed, 2 bad arguments)."""
    try:
        workflow = load_api_workflow(args.workflow)
        folder = resolve_checkpoint_folder(args.checkpoints, output_dir=args.output_dir)
        try:
            found = list_checkpoints(
                folder,
                every_k=args.every_k,
                step_min=args.step_min,
                step_max=args.step_max,
                include_base=args.include_base,
            )
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        checkpoints = [c for c in found if c.path is None or c.path.is_file()]
        for skipped in (c for c in found if c not in checkpoints):
            log.warning(
                "finetune: %s is a folder, which ComfyUI's loaders cannot load; skipped", skipped.path
            )
        # Check the workflow before connecting, so a typo is reported even with ComfyUI stopped.
        check_input(workflow, args.node, args.input)
        with ComfyClient(args.server, timeout=args.timeout) as client:
            result = sweep(
                client,
                workflow,
                checkpoints,
                node=args.node,
                input_name=args.input,
                name_prefix=args.name_prefix,
                prompt_node=args.prompt_node,
                prompt_input=args.prompt_input,
                prompts=args.prompt,
                output_node=args.output_node,
            )
        strip = labeled_strip(
            result.images,
            result.labels,
            row_labels=result.row_labels or None,
            columns=0 if result.row_labels else args.columns,
            font_size=args.font_size,
            title=args.title,
        )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        strip.save(out)
    except SweepError as exc:
        sys.stderr.write(f"sweep: {exc}\n")
        return 1
    except ValueError as exc:  # strip layout arguments
        sys.stderr.write(f"sweep: {exc}\n")
        return 2
    log.info("finetune: wrote %s (%d renders)", out, len(result.images))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m trainer.sweep_client``) until the CLI registers ``sweep``."""
    parser = argparse.ArgumentParser(prog="python -m trainer sweep", description=__doc__.splitlines()[0])
    add_sweep_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_sweep(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
