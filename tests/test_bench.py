"""``python -m bench --smoke``: the benchmark's plumbing on the CPU with tiny models, our step
through the engine's own ``_train_step`` and (emulated) step graphs, so a GPU call is not spent
finding a broken bench."""

from __future__ import annotations

import re

from bench.__main__ import main


def test_the_smoke_bench_runs_our_graph_step_and_matches_eager(capsys):
    code = main(
        ["--smoke", "--cases", "sd15-lora-b1", "--variants", "ref,default,eager", "--parity", "sd15-lora-b1"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "failed" not in out
    # captured / replayed / eager micro-batches of the default variant
    assert re.search(r"sd15-lora-b1 default .* graphs 1/1/2", out), out
    parity = re.search(r"parity sd15-lora-b1 eager vs default over 3 steps: max \|dloss\|/loss (\S+),", out)
    assert parity and float(parity.group(1)) == 0.0, out


def test_a_parity_case_must_be_one_of_the_cases(capsys):
    code = main(["--smoke", "--cases", "sd15-lora-b1", "--parity", "sd15-lora-b1,sdxl-lora-b1"])
    assert code == 2
    assert "--parity ['sdxl-lora-b1']: also name them in --cases" in capsys.readouterr().err


def test_the_peer_variant_is_the_reference_compiled_and_every_row_shows_ours_over_it(capsys):
    code = main(["--smoke", "--cases", "sd15-lora-b1", "--variants", "ref,peer,default"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "x peer" in out
    rows = {
        m.group(1): m
        for m in re.finditer(r"^sd15-lora-b1 (ref|peer|default)\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    }
    assert set(rows) == {"ref", "peer", "default"}, out
    assert "whole denoiser under torch.compile" in rows["peer"].string[rows["peer"].start() :].splitlines()[0]
    # ours / peer of the peer row itself is 1
    assert float(rows["peer"].group(4)) == 1.0, out
