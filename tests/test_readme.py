"""The README against the code: node ids, CLI commands, option defaults, routes, events, links.

Everything is read from the source without ComfyUI (node ids are parsed from the node modules the
extension lists), so a renamed node, a new subcommand or a changed default fails here until the
README says the same.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import json
import re
import shlex
from pathlib import Path

import pytest
from aiohttp import web
from comfy_server import import_pack

from trainer.cli import build_parser
from trainer.config import TrainConfig
from trainer.options import validate
from trainer.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

_NODE_ID = re.compile(r"""node_id\s*=\s*["'](\w+)["']""")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def node_modules() -> list[str]:
    """The module names in ``nodes/extension.py``'s ``NODE_MODULES``, read with ``ast``."""
    tree = ast.parse((ROOT / "nodes" / "extension.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "NODE_MODULES" for t in targets):
            return [module for module, _ in ast.literal_eval(node.value)]
    raise AssertionError("nodes/extension.py has no NODE_MODULES")


def registered_node_ids() -> list[str]:
    """Every ``node_id="…"`` in the node modules the extension serves (those that exist yet)."""
    ids = []
    for module in node_modules():
        path = ROOT / "nodes" / f"{module}.py"
        if path.is_file():
            ids += _NODE_ID.findall(path.read_text(encoding="utf-8"))
    return ids


def cli_subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def section(title: str) -> str:
    """The README text from the heading ``title`` to the next heading of the same or higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, re.MULTILINE)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def shell_commands() -> list[str]:
    """The commands in the README's fenced blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _FENCE.findall(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                commands.append(line)
    return commands


def option_rows() -> dict[str, str]:
    """``{option: default cell}`` from every README table whose header is ``| Option | Default |``."""
    rows: dict[str, str] = {}
    in_table = False
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["Option", "Default"]:
            in_table = True
            continue
        if not cells:
            in_table = False
        elif in_table and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def parse_default(cell: str):
    """A README default cell as a Python value: on/off, numbers, `text`, (empty)."""
    text = cell.strip("`")
    if text in ("on", "off"):
        return text == "on"
    if text == "(empty)":
        return None
    try:
        return float(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------------------------


def test_every_registered_node_id_is_documented():
    ids = registered_node_ids()
    assert len(ids) >= 15, f"expected the pack's 15 nodes, parsed {ids}"
    missing = [i for i in ids if f"`{i}`" not in README]
    assert missing == []


def test_node_tables_list_each_node_under_its_category():
    expected = {
        "dataset_nodes": "finetune/dataset",
        "train_nodes": "finetune/train",
        "checkpoint_nodes": "finetune/checkpoints",
    }
    for module, category in expected.items():
        ids = _NODE_ID.findall((ROOT / "nodes" / f"{module}.py").read_text(encoding="utf-8"))
        table = section(f"`{category}`")
        assert [i for i in ids if f"| `{i}`" not in table] == [], category


def test_every_cli_subcommand_is_documented():
    subcommands = cli_subcommands()
    assert subcommands == ["demo", "plan", "sweep", "train"]
    documented = {c.split()[3] for c in shell_commands() if c.startswith("python -m trainer ")}
    assert documented == set(subcommands)


def test_documented_trainer_commands_parse():
    commands = [c for c in shell_commands() if "-m trainer " in c]
    assert len(commands) >= 6
    for command in commands:
        argv = shlex.split(command.split("-m trainer ", 1)[1])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's command does not parse: {command}")
        assert args.command == argv[0]


def test_documented_bench_commands_exist_with_their_flags():
    found: dict[str, set[str]] = {}
    for command in shell_commands():
        match = re.search(r"-m (bench(?:\.\w+)?)\b(.*)", command)
        if match:
            found.setdefault(match.group(1), set()).update(re.findall(r"(--[a-z0-9-]+)", match.group(2)))
    assert set(found) == {"bench", "bench.sweep_speed", "bench.comfy_gpu"}
    assert {"--cases", "--variants", "--e2e", "--smoke"} <= found["bench"]
    assert {"--scenarios", "--card-gib", "--smoke", "--comfy", "--python", "--out"} <= found[
        "bench.comfy_gpu"
    ]
    for module, flags in found.items():
        path = ROOT / (module.replace(".", "/") + ".py" if "." in module else "bench/__main__.py")
        if path.with_suffix("").is_dir():  # a package: its command line is in __main__.py
            path = path.with_suffix("") / "__main__.py"
        source = path.read_text(encoding="utf-8")
        assert sorted(f for f in flags if f'"{f}"' not in source) == [], module


def test_option_tables_match_config_defaults():
    rows = option_rows()
    defaults = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert {"lora_rank", "learning_rate", "flow_shift", "t5_max_length", "precondition_outputs"} <= set(rows)
    for name, cell in rows.items():
        assert name in defaults, f"README documents {name!r}, which TrainConfig does not have"
        field = defaults[name]
        value = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if isinstance(value, enum.Enum):
            value = value.value
        documented = parse_default(cell)
        if documented is None:
            assert value in ([], ""), name
        elif isinstance(value, bool):
            assert documented is value, name
        elif isinstance(value, (int, float)):
            assert documented == pytest.approx(float(value)), name
        else:
            assert documented == value, name


def test_sd3_defaults_in_prose_match_config():
    sd3 = section("SD3 Medium")
    config = TrainConfig()
    assert config.timestep_sampling.value == "logit_normal" and "`--weighting_scheme logit_normal`" in sd3
    assert (config.logit_mean, config.logit_std) == (0.0, 1.0) and "`--logit_std 1.0`" in sd3
    assert config.precondition_outputs and "`--precondition_outputs 1`" in sd3
    assert config.t5_max_length == 77 and "`--max_sequence_length 77`" in sd3
    assert config.flow_shift == 3.0 and "`flow_schedule_shift` 3" in sd3


def test_documented_run_config_is_a_valid_train_config():
    blocks = re.findall(r"^```json\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1
    config = TrainConfig.from_dict(json.loads(blocks[0]))
    validate(config)
    assert (config.run_name, config.batch_size, config.epochs) == ("k4s4-style", 2, 10)
    assert config.dataset.parts[0].policy.keep_tokens == 1


def test_tutorial_workflow_has_the_settings_the_readme_names():
    sd3 = section("SD3 Medium")
    assert "workflows/train_full_sd3_medium.json" in sd3
    graph = json.loads((ROOT / "workflows" / "train_full_sd3_medium.api.json").read_text(encoding="utf-8"))
    nodes = {node["class_type"]: node["inputs"] for node in graph.values()}
    train = nodes["FinetuneTrainFull"]
    documented = {
        "learning_rate": 1.5e-5,
        "batch_size": 6,
        "lr_scheduler": "cosine",
        "lr_warmup": 0.1,
        "checkpoint_every": 800,
        "keep_checkpoints": 30,
        "validation_every": 200,
        "epochs": 30,
    }
    assert {k: train[k] for k in documented} == documented
    assert train["ckpt_name"] == "sd3_medium_incl_clips.safetensors"
    assert nodes["FinetuneDatasetRepeat"]["repeat_factor"] == 10
    for key, value in documented.items():
        shown = value if isinstance(value, str) else "1.5e-5" if key == "learning_rate" else f"{value:g}"
        assert f"`{key}` {shown}" in sd3 or f"`{key}` `{shown}`" in sd3, key


def test_step_plan_example_is_what_the_planner_computes():
    plan = make_plan(samples_per_epoch=476 * 10, batch_size=6, epochs=30)
    text = section("Datasets")
    for number in (
        plan.steps_per_epoch,
        plan.total_steps,
        plan.checkpoint_every,
        plan.validation_every,
        plan.warmup_steps,
    ):
        assert f"**{number:,}" in text, number
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (794, 23_820, 2_382)


def test_every_route_is_documented():
    routes = import_pack("nodes.routes")
    table = web.RouteTableDef()
    routes.register_routes(table, manager=None, runs_root=ROOT / "unused")
    documented = section("HTTP API and websocket events")
    listed = sorted(f"| {r.method} | `{r.path}" for r in table)
    assert len(listed) == 9
    assert [r for r in listed if r not in documented] == []


def test_every_websocket_event_is_documented():
    source = (ROOT / "nodes" / "progress.py").read_text(encoding="utf-8")
    events = set(re.findall(r'_send\(\s*"(finetune\.\w+)"', source))
    assert events == {
        "finetune.progress",
        "finetune.sample",
        "finetune.state",
        "finetune.checkpoint",
        "finetune.error",
    }
    documented = section("HTTP API and websocket events")
    assert sorted(e for e in events if f"| `{e}` |" not in documented) == []


def test_relative_links_point_at_files_in_the_repository():
    links = [link for link in _LINK.findall(README) if not link.startswith(("http", "#"))]
    assert "workflows/README.md" in links
    assert [link for link in links if not (ROOT / link.split("#")[0]).exists()] == []


def test_fresh_machine_commands_are_the_two_scripts():
    block = section("Two commands")
    commands = [c.split("#")[0].strip() for c in _FENCE.findall(block)[0].splitlines() if c.strip()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    assert all((ROOT / c).is_file() for c in commands)
