"""The shared workflows' node definitions (from ``/object_info``), their validation, and API <-> UI
conversion; a dev and test tool (``tests/workflow_sync.py`` writes the files with it).

The API files (``workflows/*.api.json``, what ``/prompt`` takes) are the source of truth for the
graph; the UI files (``workflows/*.json``, what one drags into ComfyUI) are generated from them by
:func:`api_to_ui`, which keeps the layout of the previous UI file (node positions and sizes, Note
nodes, groups), so a UI file only changes where its graph changed.

The frontend rules mirrored here were read from ``comfyui-frontend-package`` 1.49 (ComfyUI v0.33):

- a node's ``inputs`` lists its socket inputs first, then one entry per widget (``"widget": {"name"}``);
  a link's target slot indexes that list; a V3 autogrow input (Batch Images) has one slot per
  linked item (``images.image0``, ...) plus one empty slot;
- ``widgets_values`` follows the widget order, and an INT widget gets an extra *control after
  generate* value right after it when its spec says ``control_after_generate`` or, with no such key,
  when it is named ``seed`` or ``noise_seed``; a FLOAT or COMBO widget only when the spec says so (a
  COMBO then also gets a filter-list value). The API format has no such values;
- a FLOAT widget shows and rounds its value to the decimals of its step.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The recorded /object_info of our nodes and the core nodes the workflows use (tests/workflow_sync.py).
SNAPSHOT = ROOT / "tests" / "data" / "object_info_finetune.json"

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Frontend-only nodes: in UI files, never in the API format.
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
SEED_NAMES = ("seed", "noise_seed")
# Combos listing files (or runs) of the user's machine: their value is only checked to be a string.
FILE_LIST_INPUTS = frozenset(
    {"ckpt_name", "lora_name", "unet_name", "vae_name", "clip_name", "clip_name1", "clip_name2",
     "clip_name3", "diffusers_model", "clip_l", "clip_g", "t5xxl", "run"}
)  # fmt: skip
# What control_after_generate widgets are set to in our files: a sweep or an A/B test must not
# get a new seed on every queue, and a Train node whose seed changed refuses to continue its run.
CONTROL_VALUE = "fixed"
NODE_WIDTH = 360
ROW = 24  # height of one widget or slot row on the canvas


@dataclass(frozen=True)
class InputSpec:
    """One input of a node as ``/object_info`` describes it.

    A V3 *autogrow* input (``COMFY_AUTOGROW_V3``, e.g. Batch Images' ``images``) is one spec whose
    ``grow`` lists the names of its slots (``images.image0``, ...); :meth:`NodeDef.slots` turns it
    into one spec per slot in use.
    """

    name: str
    type: str  # "INT", "COMBO" (also for V1 list combos), "MODEL", ...; an autogrow's template type
    options: Mapping[str, Any]
    required: bool
    choices: tuple | None = None  # the options of a combo
    grow: tuple[str, ...] = ()  # autogrow only: every slot name, in order
    grow_min: int = 0  # autogrow only: how many of them are required

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False) and not self.grow

    def control_values(self) -> list[Any]:
        """The extra ``widgets_values`` the frontend stores right after this widget."""
        control = self.options.get("control_after_generate")
        if self.type == "INT" and (control if control is not None else self.name in SEED_NAMES):
            return [CONTROL_VALUE]
        if self.type == "FLOAT" and control:
            return [CONTROL_VALUE]
        if self.type == "COMBO" and control:
            return [CONTROL_VALUE, ""]  # mode, then the filter list
        return []

    def default(self) -> Any:
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            return self.choices[0] if self.choices else ""
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type)


def _input_spec(name: str, spec: list, *, required: bool) -> InputSpec:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(spec[0], list):
        return InputSpec(name, "COMBO", options, required, tuple(spec[0]))
    if spec[0] == "COMBO":
        return InputSpec(name, "COMBO", options, required, tuple(options.get("options", ())))
    if spec[0] == "COMFY_AUTOGROW_V3":
        template = options["template"]
        section = "required" if template["input"].get("required") else "optional"
        (template_spec,) = template["input"][section].values()
        names = template.get("names") or [f"{template['prefix']}{i}" for i in range(template["max"])]
        grow_min = template.get("min", 0) if section == "required" and required else 0
        return InputSpec(
            name, template_spec[0], {}, required, grow=tuple(f"{name}.{n}" for n in names), grow_min=grow_min
        )
    return InputSpec(name, spec[0], options, required)


@dataclass(frozen=True)
class NodeDef:
    """A node class as ``/object_info`` describes it, in the frontend's slot and widget order."""

    class_type: str
    display_name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type)
    output_node: bool

    @classmethod
    def from_object_info(cls, class_type: str, entry: Mapping[str, Any]) -> NodeDef:
        order = entry.get("input_order") or {k: list(v) for k, v in entry["input"].items()}
        inputs = [
            _input_spec(name, entry["input"][section][name], required=section == "required")
            for section in ("required", "optional")
            for name in order.get(section, [])
        ]
        outputs = tuple(zip(entry.get("output_name", entry["output"]), entry["output"], strict=True))
        return cls(
            class_type=class_type,
            display_name=entry.get("display_name") or class_type,
            inputs=tuple(inputs),
            outputs=outputs,
            output_node=bool(entry.get("output_node")),
        )

    def input(self, name: str) -> InputSpec | None:
        """The spec of an input by name; an autogrow slot (``images.image2``) gets its own spec."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
            if name in spec.grow:
                return InputSpec(name, spec.type, {}, spec.grow.index(name) < spec.grow_min)
        return None

    def slots(self, present: Collection[str] = (), *, ui: bool = False) -> list[InputSpec]:
        """Every input in definition order, autogrow inputs expanded to the slots in ``present``
        (and their required ones); ``ui=True`` adds the frontend's trailing empty autogrow slot."""
        out = []
        for spec in self.inputs:
            if not spec.grow:
                out.append(spec)
                continue
            used = [n for i, n in enumerate(spec.grow) if i < spec.grow_min or n in present]
            unused = [n for n in spec.grow if n not in used]
            if ui and unused:
                used.append(unused[0])
            out.extend(self.input(n) for n in used)
        return out

    def ui_inputs(self, present: Collection[str] = ()) -> list[InputSpec]:
        """The node's input slots in a UI file: sockets first, then one per widget."""
        slots = self.slots(present, ui=True)
        return [i for i in slots if not i.is_widget] + [i for i in slots if i.is_widget]

    @property
    def widgets(self) -> list[InputSpec]:
        return [i for i in self.inputs if i.is_widget]


def load_defs(object_info: Mapping[str, Any] | str | Path = SNAPSHOT) -> dict[str, NodeDef]:
    """Node definitions by class type, from an ``/object_info`` dict or a JSON file of one."""
    if not isinstance(object_info, Mapping):
        object_info = json.loads(Path(object_info).read_text(encoding="utf-8"))
    return {name: NodeDef.from_object_info(name, entry) for name, entry in object_info.items()}


def types_match(output_type: str, input_type: str) -> bool:
    """ComfyUI's link rule: equal types, ``*`` on either side, or a shared member of "A,B" lists."""
    if "*" in (output_type, input_type) or output_type == input_type:
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def is_link(value: Any) -> bool:
    """An API-format input that links to another node's output: ``["node id", slot]``."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


# --------------------------------------------------------------------------------------------
# Validation


def check_widget_value(spec: InputSpec, value: Any) -> str | None:
    """Why ``value`` is not valid for the widget ``spec`` (None if it is)."""
    if spec.type == "COMBO":
        if spec.name in FILE_LIST_INPUTS:
            return None if isinstance(value, str) and value else f"{value!r} is not a file name"
        if value not in (spec.choices or ()):
            return f"{value!r} is not one of {', '.join(map(str, spec.choices or ()))}"
        return None
    if spec.type == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if spec.type == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if spec.type == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an integer"
    if spec.type == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{value!r} is not a number"
    if spec.type == "FLOAT" and not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if spec.type == "FLOAT" and (problem := _float_precision_problem(spec, value)) is not None:
        return problem
    low, high = spec.options.get("min"), spec.options.get("max")
    if low is not None and value < low:
        return f"{value!r} is below the minimum {low}"
    if high is not None and value > high:
        return f"{value!r} is above the maximum {high}"
    return None


def float_decimals(spec: InputSpec) -> int:
    """Decimals the frontend shows and rounds a FLOAT widget to: those of its step (0.5 if none)."""
    return max(0, -math.floor(math.log10(spec.options.get("step") or 0.5)))


def _float_precision_problem(spec: InputSpec, value: float) -> str | None:
    # The frontend shows value.toFixed(decimals) and rounds every edit to that precision, so a value
    # finer than the step's decimals would show (and be saved back) as another number.
    decimals = float_decimals(spec)
    if abs(round(value, decimals) - value) > 1e-9 * max(1.0, abs(value)):
        return (
            f"{value!r} has more decimals than the widget's step {spec.options.get('step')} shows "
            f"({decimals}); the frontend would show and save {round(value, decimals)!r}"
        )
    return None


def validate_api(prompt: Mapping[str, Any], defs: Mapping[str, NodeDef]) -> list[str]:
    """Every problem of an API-format prompt against the node definitions (empty if none).

    Checks: node classes exist; required inputs are present and no unknown ones; widget values
    are valid (combo choices, min/max, types; file-list combos only need a string); links point
    at an existing output whose type matches the input's; the prompt has an output node.
    """
    errors = []
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node.get('class_type')})"
        node_def = defs.get(node.get("class_type"))
        if node_def is None:
            errors.append(f"{where}: unknown node class; it is not in /object_info")
            continue
        given = node.get("inputs", {})
        for spec in node_def.slots(given):
            if spec.required and spec.name not in given:
                errors.append(f"{where}: required input {spec.name!r} is missing")
        for name, value in given.items():
            spec = node_def.input(name)
            if spec is None:
                errors.append(f"{where}: has no input {name!r}")
            elif is_link(value):
                errors.extend(_check_link(prompt, defs, where, spec, value))
            elif not spec.is_widget:
                errors.append(f"{where}: input {name!r} ({spec.type}) must be linked, got {value!r}")
            elif (problem := check_widget_value(spec, value)) is not None:
                errors.append(f"{where}: input {name!r} = {problem}")
    if not any(defs[n["class_type"]].output_node for n in prompt.values() if n.get("class_type") in defs):
        errors.append("the prompt has no output node, so ComfyUI would refuse it")
    return errors


def _check_link(prompt, defs, where: str, spec: InputSpec, value: list) -> list[str]:
    source_id, slot = value
    source = prompt.get(source_id)
    if source is None:
        return [f"{where}: input {spec.name!r} links to missing node {source_id}"]
    source_def = defs.get(source["class_type"])
    if source_def is None:
        return []  # reported for the source node itself
    if not 0 <= slot < len(source_def.outputs):
        return [f"{where}: input {spec.name!r} links to output {slot} of node {source_id}, which has none"]
    out_type = source_def.outputs[slot][1]
    if not types_match(out_type, spec.type):
        return [
            f"{where}: input {spec.name!r} ({spec.type}) is linked to output {slot} of node {source_id} "
            f"({source_def.class_type}), which is {out_type}"
        ]
    return []


def validate_ui(workflow: Mapping[str, Any], defs: Mapping[str, NodeDef]) -> list[str]:
    """Structural problems of a UI-format workflow: links that disagree with the nodes' slots,
    slot lists and ``widgets_values`` that do not match the node definitions."""
    errors = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        node_def = defs.get(node["type"])
        where = f"node {node['id']} ({node['type']})"
        if node_def is None:
            if node["type"] not in VIRTUAL_NODES:
                errors.append(f"{where}: unknown node class")
            continue
        linked = [i["name"] for i in node.get("inputs", []) if i.get("link") is not None]
        expected_inputs = [(i.name, i.type) for i in node_def.ui_inputs(linked)]
        if [(i["name"], i["type"]) for i in node.get("inputs", [])] != expected_inputs:
            errors.append(
                f"{where}: inputs {node.get('inputs')} differ from the definition's {expected_inputs}"
            )
        if [(o["name"], o["type"]) for o in node.get("outputs", [])] != list(node_def.outputs):
            errors.append(f"{where}: outputs differ from the definition's {list(node_def.outputs)}")
        expected_len = sum(1 + len(w.control_values()) for w in node_def.widgets)
        if len(node.get("widgets_values", [])) != expected_len:
            errors.append(
                f"{where}: {len(node.get('widgets_values', []))} widgets_values, expected {expected_len}"
            )
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        where = f"link {link_id}"
        if src not in nodes or dst not in nodes:
            errors.append(f"{where}: joins missing node {src if src not in nodes else dst}")
            continue
        output = nodes[src]["outputs"][src_slot]
        target = nodes[dst]["inputs"][dst_slot]
        if link_id not in (output.get("links") or []) or target.get("link") != link_id:
            errors.append(
                f"{where}: not listed on both ends (node {src} slot {src_slot}, node {dst} slot {dst_slot})"
            )
        if output["type"] != link_type or not types_match(link_type, target["type"]):
            errors.append(f"{where}: {output['type']} -> {target['type']} (link says {link_type})")
    return errors


# --------------------------------------------------------------------------------------------
# Conversion


def ui_to_api(workflow: Mapping[str, Any], defs: Mapping[str, NodeDef]) -> dict[str, Any]:
    """The API-format prompt of a UI workflow (what the frontend's *Export (API)* writes)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        node_def = defs[node["type"]]
        inputs: dict[str, Any] = {}
        values = iter(node.get("widgets_values", []))
        for spec in node_def.widgets:
            inputs[spec.name] = next(values)
            for _ in spec.control_values():
                next(values)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        ordered = {s.name: inputs[s.name] for s in node_def.slots(inputs) if s.name in inputs}
        title = node.get("title") or node_def.display_name
        prompt[str(node["id"])] = {"inputs": ordered, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


def api_to_ui(
    prompt: Mapping[str, Any],
    defs: Mapping[str, NodeDef],
    *,
    name: str,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A UI-format (version 0.4) workflow for an API-format prompt.

    Args:
        prompt: The API-format prompt; node ids must be integers written as strings.
        defs: Node definitions (:func:`load_defs`).
        name: The workflow's name; the workflow id is derived from it, so regenerating is stable.
        previous: The current UI file, if any: node positions, sizes, colours, Note nodes, groups
            and ``extra`` are kept from it; new nodes are laid out in columns by graph depth.

    Returns:
        The workflow, ready for ``json.dump``.

    Raises:
        ValueError: the prompt does not validate (:func:`validate_api`), listing every problem.
    """
    problems = validate_api(prompt, defs)
    if problems:
        raise ValueError(f"workflow {name!r} is invalid:\n  " + "\n  ".join(problems))
    kept = {n["id"]: n for n in (previous or {}).get("nodes", [])}
    layout = _auto_layout(prompt, defs)
    nodes, links = [], []
    outputs_of: dict[int, list[dict]] = {}
    for node_id in sorted(prompt, key=int):
        outputs_of[int(node_id)] = [
            {"name": out_name, "type": out_type, "links": []}
            for out_name, out_type in defs[prompt[node_id]["class_type"]].outputs
        ]
    for order, node_id in enumerate(_topological(prompt)):
        node = prompt[node_id]
        node_def = defs[node["class_type"]]
        given = node["inputs"]
        slots = []
        for spec in node_def.ui_inputs(given):
            slot: dict[str, Any] = {"name": spec.name, "type": spec.type, "link": None}
            if "." in spec.name:  # an autogrow slot: the frontend labels it without its group
                slot = {"label": spec.name.split(".", 1)[1], **slot}
            if spec.is_widget:
                slot["widget"] = {"name": spec.name}
            if is_link(given.get(spec.name)):
                src, src_slot = given[spec.name]
                link_id = len(links) + 1
                out_type = defs[prompt[src]["class_type"]].outputs[src_slot][1]
                links.append([link_id, int(src), src_slot, int(node_id), len(slots), out_type])
                outputs_of[int(src)][src_slot]["links"].append(link_id)
                slot["link"] = link_id
            slots.append(slot)
        values = []
        for spec in node_def.widgets:
            value = given.get(spec.name)
            values.append(spec.default() if value is None or is_link(value) else value)
            values.extend(spec.control_values())
        old = kept.get(int(node_id), {})
        entry = {
            "id": int(node_id),
            "type": node["class_type"],
            "pos": old.get("pos", layout[node_id][0]),
            "size": old.get("size", layout[node_id][1]),
            "flags": old.get("flags", {}),
            "order": order,
            "mode": 0,
            "inputs": slots,
            "outputs": outputs_of[int(node_id)],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": values,
        }
        title = node.get("_meta", {}).get("title")
        if title and title != node_def.display_name:
            entry["title"] = title
        for key in ("color", "bgcolor"):
            if key in old:
                entry[key] = old[key]
        nodes.append(entry)
    for out in (o for outs in outputs_of.values() for o in outs):
        out["links"] = out["links"] or None
    notes = [
        {**note, "order": len(nodes) + offset}
        for offset, note in enumerate(
            n for n in (previous or {}).get("nodes", []) if n["type"] in VIRTUAL_NODES
        )
    ]
    all_nodes = sorted(nodes + notes, key=lambda n: n["id"])
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-finetune/workflows/{name}")),
        "revision": 0,
        "last_node_id": max(n["id"] for n in all_nodes),
        "last_link_id": len(links),
        "nodes": all_nodes,
        "links": links,
        "groups": (previous or {}).get("groups", []),
        "config": {},
        "extra": (previous or {}).get("extra", {"ds": {"scale": 0.8, "offset": [0, 0]}}),
        "version": 0.4,
    }


def _topological(prompt: Mapping[str, Any]) -> list[str]:
    """Node ids, every node after the nodes it links from (ties in id order)."""
    done: list[str] = []
    pending = sorted(prompt, key=int)
    while pending:
        ready = [n for n in pending if all(v[0] in done for v in prompt[n]["inputs"].values() if is_link(v))]
        if not ready:
            raise ValueError(f"the prompt has a cycle among nodes {pending}")
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def node_size(node_def: NodeDef) -> list[int]:
    """A canvas size that fits the node's slots and its visible (non-advanced) widgets."""
    visible = [w for w in node_def.widgets if not w.options.get("advanced")]
    rows = max(len([i for i in node_def.inputs if not i.is_widget]), len(node_def.outputs))
    height = 30 + ROW * rows + ROW * len(visible)
    height += sum(76 for w in visible if w.options.get("multiline"))
    if node_def.output_node:
        height += 240  # room for the images or text the node shows once it ran
    return [NODE_WIDTH, height]


def _auto_layout(prompt: Mapping[str, Any], defs: Mapping[str, NodeDef]) -> dict[str, tuple[list, list]]:
    """(pos, size) per node id: one column per graph depth, nodes stacked in id order."""
    depth: dict[str, int] = {}
    for node_id in _topological(prompt):
        parents = [v[0] for v in prompt[node_id]["inputs"].values() if is_link(v)]
        depth[node_id] = 1 + max((depth[p] for p in parents), default=-1)
    tops: dict[int, int] = {}
    layout = {}
    for node_id in sorted(prompt, key=int):
        column = depth[node_id]
        size = node_size(defs[prompt[node_id]["class_type"]])
        y = tops.get(column, 60)
        layout[node_id] = ([40 + column * (NODE_WIDTH + 60), y], size)
        tops[column] = y + size[1] + 60
    return layout
