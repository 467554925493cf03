"""Write the shared workflows: regenerate the UI files from the API files, complete API files when
a node gains widgets, and record the trimmed ``/object_info`` snapshot the static tests use.

    python tests/workflow_sync.py record --server http://127.0.0.1:8188   # a server with empty model folders
    python tests/workflow_sync.py sync [--complete]                        # workflows/*.json from *.api.json

A dev tool; :mod:`workflow_tools` holds the node definitions, validation and conversion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workflow_tools import ROOT, SNAPSHOT, NodeDef, api_to_ui, load_defs

WORKFLOWS_DIR = ROOT / "workflows"


def complete_api(prompt: Mapping[str, Any], defs: Mapping[str, NodeDef]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``prompt`` with every widget the frontend would export: missing widgets at their
    default, unknown inputs dropped, inputs in definition order, ``_meta.title`` filled in.

    Returns:
        The completed prompt and a line per input added or dropped (for the dev's review).
    """
    done, changes = {}, []
    for node_id, node in prompt.items():
        node_def = defs[node["class_type"]]
        inputs = dict(node.get("inputs", {}))
        for name in [n for n in inputs if node_def.input(n) is None]:
            changes.append(f"node {node_id} ({node_def.class_type}): dropped unknown input {name!r}")
            del inputs[name]
        for spec in node_def.widgets:
            if spec.name not in inputs:
                inputs[spec.name] = spec.default()
                changes.append(
                    f"node {node_id} ({node_def.class_type}): added {spec.name}={spec.default()!r}"
                )
        title = node.get("_meta", {}).get("title") or node_def.display_name
        done[node_id] = {
            "inputs": {s.name: inputs[s.name] for s in node_def.slots(inputs) if s.name in inputs},
            "class_type": node_def.class_type,
            "_meta": {"title": title},
        }
    return done, changes


def dumps(data: Any) -> str:
    """JSON with two-space indents, and any list or object that fits in 100 characters on one line
    (slots, links, positions), so diffs of regenerated files stay readable."""

    def render(value: Any, indent: int) -> str:
        flat = json.dumps(value, ensure_ascii=False)
        if not isinstance(value, (dict, list)) or not value or len(flat) + indent <= 100:
            return flat
        pad, inner = " " * indent, " " * (indent + 2)
        if isinstance(value, dict):
            items = [
                f"{inner}{json.dumps(k, ensure_ascii=False)}: {render(v, indent + 2)}"
                for k, v in value.items()
            ]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        return "[\n" + ",\n".join(f"{inner}{render(v, indent + 2)}" for v in value) + f"\n{pad}]"

    return render(data, 0) + "\n"


def workflow_names(folder: Path = WORKFLOWS_DIR) -> list[str]:
    """Names of the workflows in ``folder`` (``NAME.api.json`` files), sorted."""
    return sorted(p.name[: -len(".api.json")] for p in folder.glob("*.api.json"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def sync(
    folder: Path = WORKFLOWS_DIR, *, defs: Mapping[str, NodeDef] | None = None, complete: bool = False
) -> list[Path]:
    """Regenerate every ``NAME.json`` from its ``NAME.api.json``; returns the files rewritten.

    Args:
        folder: The workflows folder.
        defs: Node definitions; default: the recorded snapshot.
        complete: First bring the API files up to the node definitions (:func:`complete_api`):
            what a node gained is added at its default, what it lost is dropped.
    """
    defs = defs if defs is not None else load_defs()
    changed = []
    for name in workflow_names(folder):
        api_path, ui_path = folder / f"{name}.api.json", folder / f"{name}.json"
        prompt = read_json(api_path)
        if complete:
            prompt, changes = complete_api(prompt, defs)
            if changes:
                api_path.write_text(dumps(prompt), encoding="utf-8")
                changed.append(api_path)
        previous = read_json(ui_path) if ui_path.exists() else None
        text = dumps(api_to_ui(prompt, defs, name=name, previous=previous))
        if not ui_path.exists() or ui_path.read_text(encoding="utf-8") != text:
            ui_path.write_text(text, encoding="utf-8")
            changed.append(ui_path)
    return changed


def trimmed_object_info(object_info: Mapping[str, Any], folder: Path = WORKFLOWS_DIR) -> dict[str, Any]:
    """The entries of our nodes (``Finetune*``) and of every core node the workflows use."""
    used = {
        node["class_type"]
        for name in workflow_names(folder)
        for node in read_json(folder / f"{name}.api.json").values()
    }
    keep = sorted(n for n in object_info if n.startswith("Finetune") or n in used)
    return {n: object_info[n] for n in keep}


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import urllib.request

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sync_cmd = sub.add_parser("sync", help="regenerate workflows/*.json from workflows/*.api.json")
    sync_cmd.add_argument(
        "--complete", action="store_true", help="also add new widgets (at their defaults) to the API files"
    )
    record = sub.add_parser("record", help="record the trimmed /object_info snapshot")
    source = record.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="a running ComfyUI (start it with empty model folders)")
    source.add_argument("--from-file", type=Path, help="a saved /object_info JSON")
    args = parser.parse_args(argv)
    if args.command == "record":
        if args.from_file:
            info = read_json(args.from_file)
        else:
            with urllib.request.urlopen(f"{args.server.rstrip('/')}/object_info", timeout=60) as resp:
                info = json.loads(resp.read())
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(dumps(trimmed_object_info(info)), encoding="utf-8")
        print(f"wrote {SNAPSHOT}")
    else:
        for path in sync(complete=args.complete):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
