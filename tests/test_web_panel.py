"""The Finetune sidebar panel (web/) inside the real ComfyUI frontend, driven by headless Chromium.

The server is the real ``main.py --cpu`` from ``COMFYUI_PATH`` (see ``comfy_server.py``) with the
pack loaded; the browser is Debian's ``chromium`` driven by the ``playwright`` package (its driver
only: no ``playwright install``). Skipped without ``COMFYUI_PATH``, without playwright or without
chromium (``CHROMIUM_PATH`` overrides ``/usr/bin/chromium``).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q tests/test_web_panel.py``.
Screenshots are kept in ``/tmp/finetune_panel.png`` (runs written by hand) and
``/tmp/finetune_panel_run.png`` (a real tiny run, stopped from the panel).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from comfy_server import ComfyClient, comfy_fixture  # noqa: F401  (the `comfy` fixture)
from PIL import Image, ImageStat

from trainer.runfolder import RunFolder

pytestmark = pytest.mark.comfyui

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="pip install playwright (the driver; no browser download)"
)
expect = sync_api.expect

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 800}
EXTENSION = "/extensions/comfyui-finetune"
TAB_BUTTON = ".comfyui-finetune-tab-button"
# Waits cover the panel's 5 s poll and a busy two-core CI machine; they never assert a duration.
POLL_WAIT_MS = 20_000
SAMPLE_COLOUR = (200, 60, 60)
NAN_MESSAGE = "loss became NaN at step 12; lower the learning rate"


def _chromium_or_skip() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}; apt-get install chromium (or set CHROMIUM_PATH)")


def _loss(step: int) -> float:
    """A falling, noisy loss; step 50 is exactly 0.0625 so its label is known."""
    if step == 50:
        return 0.0625
    return 0.05 + 0.25 * math.exp(-step / 15) + 0.02 * ((step * 37) % 7) / 7


def _metrics_row(step: int) -> dict:
    return {"step": step, "loss": _loss(step), "lr": 1e-4, "samples_per_s": 2.5, "epoch": step // 25}


def _write_cli_run(output_dir: Path, name: str, *, steps: int, total: int) -> RunFolder:
    """A run as a CLI process in another terminal leaves it mid-way: run.json says running (with
    this live test process as its pid), metrics rows 1..steps and one validation image."""
    folder = RunFolder.for_run(output_dir, name)
    folder.create()
    folder.update(
        config={"run_name": name, "method": "lora"}, plan={"total_steps": total, "steps_per_epoch": 25}
    )
    for step in range(1, steps + 1):
        folder.append_metrics(_metrics_row(step))
    Image.new("RGB", (64, 64), SAMPLE_COLOUR).save(folder.sample_path(steps, 0))
    folder.set_status("running", "", step=steps)
    return folder


def _write_failed_run(output_dir: Path, name: str) -> RunFolder:
    folder = RunFolder.for_run(output_dir, name)
    folder.create()
    folder.update(config={"run_name": name, "method": "lora"}, plan={"total_steps": 100})
    for step in range(1, 12):
        folder.append_metrics(_metrics_row(step))
    folder.set_status("failed", NAN_MESSAGE, step=11)
    return folder


@dataclass
class Browser:
    """A page of the ComfyUI frontend and the errors our extension caused in it."""

    page: object
    url: str
    errors: list[str] = field(default_factory=list)

    def open_panel(self) -> None:
        """Load the app (if needed) and open the Finetune sidebar tab."""
        page = self.page
        page.wait_for_selector(TAB_BUTTON, timeout=90_000)
        if not page.locator(".ft-panel").is_visible():
            page.click(TAB_BUTTON)
        page.wait_for_selector(".ft-panel", timeout=10_000)

    def row(self, run: str):
        return self.page.locator(f'.ft-run[data-run="{run}"]')

    def screenshot(self, path: Path, keep: str) -> Path:
        self.page.screenshot(path=str(path))
        shutil.copyfile(path, keep)
        return path


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    _chromium_or_skip()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser(comfy: ComfyClient, chromium) -> Iterator[Browser]:
    # Skip the first-run template browser, and keep the minimap out of the screenshot.
    comfy.post_json("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    b = Browser(page=page, url=comfy.url)
    page.on("pageerror", lambda e: b.errors.append(f"page error: {e}"))
    page.on(
        "console",
        lambda m: m.type == "error" and "finetune" in m.text and b.errors.append(m.text),
    )
    page.goto(comfy.url, wait_until="load")
    try:
        yield b
    finally:
        context.close()


def _assert_screenshot(path: Path) -> None:
    """A PNG of the viewport's size that shows something (not one flat colour)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (VIEWPORT["width"], VIEWPORT["height"])
        panel = img.convert("RGB").crop((60, 40, 370, 780))  # the sidebar panel's area
        assert max(ImageStat.Stat(panel).stddev) > 10
        assert len(panel.getcolors(maxcolors=1 << 20)) > 50


def test_formatters_and_chart_maths_in_the_browser(browser: Browser):
    """The modules as served by ComfyUI: durations, losses, the EMA and a flat loss."""
    browser.open_panel()
    result = browser.page.evaluate(
        """async (base) => {
            const f = await import(`${base}/finetune_api.js`);
            const c = await import(`${base}/loss_chart.js`);
            const canvas = document.createElement("canvas");
            canvas.style.width = "300px";
            document.body.append(canvas);
            const drawn = c.drawLossChart(canvas, [1, 2, 3, 4].map((step) => ({step, loss: 0.5})));
            const single = document.createElement("canvas");
            c.drawLossChart(single, [{step: 7, loss: 0.25}]);
            const lit = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data
                .filter((v, i) => i % 4 === 3 && v > 0).length;
            canvas.remove();
            return {
                durations: [3725, 125, 9.4, 0, null, -1, NaN].map(f.formatDuration),
                losses: [0.0625, 0.00012, null].map(f.formatLoss),
                lr: f.formatLr(1e-4),
                rate: f.formatRate(3.214),
                steps: [f.formatSteps(40, 100), f.formatSteps(null, 0)],
                ema: c.emaSmooth([2, 0], 0.5),
                flatRange: c.paddedRange([0.5, 0.5]),
                zeroRange: c.paddedRange([0]),
                flat: {...canvas.dataset, emaLast: drawn.emaLast},
                single: {...single.dataset},
                lit,
                actions: ["running", "paused", "stopped", "finished"].map((state) => f.allowedActions({state})),
                external: f.allowedActions({state: "running", external: true}),
            };
        }""",
        EXTENSION,
    )
    assert result["durations"] == ["1h 02m 05s", "2m 05s", "9s", "0s", "—", "—", "—"]
    assert result["losses"] == ["0.0625", "1.20e-4", "—"]
    assert result["lr"] == "1.00e-4"
    assert result["rate"] == "3.21/s"
    assert result["steps"] == ["40 / 100", "— / —"]
    assert result["ema"] == [2, pytest.approx(2 / 3)]
    assert result["flatRange"] == {
        "lo": pytest.approx(0.475),
        "hi": pytest.approx(0.525),
        "min": 0.5,
        "max": 0.5,
    }
    assert result["zeroRange"] == {"lo": pytest.approx(-0.05), "hi": pytest.approx(0.05), "min": 0, "max": 0}
    # A flat loss draws (no NaN from a zero range), labelled with its one value.
    assert result["flat"] == {"points": "4", "lastStep": "4", "yMin": "0.5", "yMax": "0.5", "emaLast": 0.5}
    assert result["single"]["points"] == "1" and result["single"]["yMin"] == "0.25"
    assert result["lit"] > 100
    assert result["actions"] == [
        {"pause": True, "resume": False, "stop": True},
        {"pause": False, "resume": True, "stop": True},
        {"pause": False, "resume": True, "stop": False},
        {"pause": False, "resume": False, "stop": False},
    ]
    assert result["external"] == {"pause": False, "resume": False, "stop": False}
    assert browser.errors == []


def test_run_store_merges_routes_and_events(browser: Browser):
    """The panel's store: the route's `total` becomes total_steps, an older run.json never moves
    a run back behind a live event, websocket points do not count as fetched metrics (events are
    throttled), resumed steps overwrite, and a failed run's message is its error until it restarts."""
    browser.open_panel()
    result = browser.page.evaluate(
        """async (base) => {
            const {RunStore} = await import(`${base}/run_store.js`);
            const store = new RunStore();
            let changes = 0;
            store.addEventListener("change", () => { changes += 1; });
            const progress = (step, loss) => store.applyProgress(
                {run: "a", step, total: 10, loss, lr: 1e-4, samples_per_s: 2, eta_s: 6, epoch: 1});
            store.setRuns([{name: "a", state: "queued", step: 0, total: 10}]);
            progress(7, 0.4);
            const live = {...store.runs.get("a")};
            store.setRuns([{name: "a", state: "running", step: 6, total: 10, loss: 0.45}]);
            const stale = {...store.runs.get("a")};
            store.addMetrics("a", [{step: 1, loss: 1.0}, {step: 2, loss: 0.9}, {step: 7, loss: 0.41}]);
            progress(8, null);
            progress(2, 0.8);
            store.applyState({run: "a", state: "failed", message: "out of GPU memory at step 8"});
            const failed = store.errorFor("a");
            store.applyState({run: "a", state: "queued", message: "queued, resuming"});
            store.applySample({run: "a", step: 8, urls: ["/finetune/runs/a/samples/step00008-0.png"]});
            store.applyProgress({run: "unknown", step: 1, total: 1, loss: 1});
            return {
                live: [live.state, live.step, live.total_steps, live.loss],
                stale: [stale.state, stale.step, stale.loss],
                fetched: store.fetchedThrough("a"),
                points: store.lossPoints("a"),
                failed,
                afterRestart: store.errorFor("a"),
                sample: store.samples.get("a"),
                known: [store.has("a"), store.has("unknown")],
                changes,
            };
        }""",
        EXTENSION,
    )
    assert result["live"] == ["running", 7, 10, 0.4]  # a progress event means the run started
    assert result["stale"] == ["running", 7, 0.4]
    assert result["fetched"] == 7
    assert result["points"] == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.8},
        {"step": 7, "loss": 0.41},
    ]  # the NaN (null) step 8 is left out; the redone step 2 replaced the first
    assert result["failed"] == "out of GPU memory at step 8"
    assert result["afterRestart"] is None
    assert result["sample"] == "/finetune/runs/a/samples/step00008-0.png"
    assert result["known"] == [True, False]
    assert result["changes"] == 9
    assert browser.errors == []


def test_panel_lists_runs_from_the_routes_and_follows_their_files(
    browser: Browser, comfy: ComfyClient, tmp_path: Path
):
    """Runs written to disk (a CLI run in progress, a failed run) are listed from the routes; the
    slow poll follows new metrics rows; a page reload rebuilds everything from the server."""
    cli = _write_cli_run(comfy.output_dir, "web-cli-run", steps=40, total=100)
    _write_failed_run(comfy.output_dir, "web-failed-run")
    page = browser.page
    browser.open_panel()
    page.click(".ft-refresh")

    row = browser.row("web-cli-run")
    expect(row.locator(".ft-badge")).to_have_text("running", timeout=POLL_WAIT_MS)
    expect(row.locator(".ft-steps")).to_have_text("40 / 100")
    expect(row.locator(".ft-progress")).to_have_attribute("data-fraction", "0.4000")
    expect(row.locator(".ft-loss")).to_have_text(f"loss {_loss(40):.4f}")
    expect(row.locator(".ft-speed")).to_have_text("2.50/s")

    failed = browser.row("web-failed-run")
    expect(failed.locator(".ft-badge")).to_have_text("failed")
    message = failed.locator(".ft-run-message")
    expect(message).to_have_text(NAN_MESSAGE)
    expect(message).to_have_class("ft-run-message ft-error")
    red, green, blue = _rgb(message.evaluate("(el) => getComputedStyle(el).color"))
    assert red >= 180 and green <= 110 and blue <= 110, (red, green, blue)

    row.click()
    chart = page.locator(".ft-detail .ft-chart")
    expect(page.locator(".ft-detail-title")).to_have_text("web-cli-run")
    expect(chart).to_have_attribute("data-points", "40", timeout=POLL_WAIT_MS)
    expect(chart).to_have_attribute("data-last-step", "40")
    # Another process's run is read-only here.
    for action in ("pause", "resume", "stop"):
        expect(page.locator(f".ft-detail .ft-{action}")).to_be_disabled()
    expect(page.locator(".ft-detail .ft-external")).to_be_visible()
    assert _sample_pixel(page) == list(SAMPLE_COLOUR)

    # The CLI run goes on: ten more rows (step 50 logs loss 0.0625), found by the poll.
    for step in range(41, 51):
        cli.append_metrics(_metrics_row(step))
    cli.set_status("running", "", step=50)
    expect(chart).to_have_attribute("data-points", "50", timeout=POLL_WAIT_MS)
    expect(row.locator(".ft-steps")).to_have_text("50 / 100")
    expect(row.locator(".ft-loss")).to_have_text("loss 0.0625")
    assert float(chart.get_attribute("data-y-max")) == pytest.approx(max(_loss(s) for s in range(1, 51)))

    # Nothing lives only in the page: after a reload the routes give the same picture.
    page.reload(wait_until="load")
    browser.open_panel()
    expect(page.locator(".ft-detail-title")).to_have_text("web-cli-run", timeout=POLL_WAIT_MS)
    expect(page.locator(".ft-detail .ft-chart")).to_have_attribute("data-points", "50", timeout=POLL_WAIT_MS)
    expect(browser.row("web-failed-run").locator(".ft-run-message")).to_have_text(NAN_MESSAGE)
    page.wait_for_function("() => document.querySelector('.ft-sample-img')?.naturalWidth === 64")

    shot = browser.screenshot(tmp_path / "panel.png", keep="/tmp/finetune_panel.png")
    _assert_screenshot(shot)
    assert browser.errors == []


def _rgb(css: str) -> tuple[int, int, int]:
    """``"rgb(220, 50, 47)"`` -> (220, 50, 47)."""
    inside = css[css.index("(") + 1 : css.index(")")]
    red, green, blue = (int(float(v)) for v in inside.split(",")[:3])
    return red, green, blue


def _sample_pixel(page) -> list[int]:
    """The centre pixel of the panel's validation image, once it has loaded."""
    page.wait_for_function(
        "() => document.querySelector('.ft-sample-img')?.naturalWidth > 0", timeout=POLL_WAIT_MS
    )
    return page.evaluate(
        """() => {
            const img = document.querySelector('.ft-sample-img');
            const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const ctx = c.getContext('2d');
            ctx.drawImage(img, 0, 0);
            return Array.from(ctx.getImageData(c.width >> 1, c.height >> 1, 1, 1).data.slice(0, 3));
        }"""
    )


def _post(run: str, action: str):
    """A predicate for Playwright's expect_request/expect_response: the panel's POST of ``action``."""

    def matches(r) -> bool:
        request = getattr(r, "request", r)  # a Response, or a Request itself
        return request.method == "POST" and request.url.endswith(f"/{run}/{action}")

    return matches


def _node_defaults(comfy: ComfyClient, node_class: str) -> dict:
    """Every widget's default value of a node, from /object_info."""
    values = {}
    info = comfy.object_info(node_class)["input"]
    for group in ("required", "optional"):
        for name, spec in info.get(group, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if "default" in opts:
                values[name] = opts["default"]
            elif isinstance(kind, list) and kind:
                values[name] = kind[0]
            elif kind == "COMBO" and opts.get("options"):
                values[name] = opts["options"][0]
    return values


def _queue_tiny_run(comfy: ComfyClient, run_name: str) -> None:
    """Queue a long tiny SD1.5 LoRA run through the stock /prompt route (it trains in the
    background; the test stops it long before its last step)."""
    # Imported here: diffusers is slow to import, and the other tests do not need it.
    from train_helpers import make_images

    from trainer.config import Arch
    from trainer.models.tiny import save_tiny_checkpoint, tiny_bundle

    # A diffusers folder carries its own (tiny) configs; ComfyUI's models/diffusers lists it.
    model = comfy.base_dir / "models" / "diffusers" / "ft-web-tiny-sd15"
    if not (model / "model_index.json").exists():
        save_tiny_checkpoint(tiny_bundle(Arch.SD15), model, single_file=False)
    make_images(comfy.input_dir / "ft_web_data", [(64, 64)] * 4)
    load = _node_defaults(comfy, "FinetuneLoadDataset") | {"folder": "ft_web_data"}
    train = _node_defaults(comfy, "FinetuneTrainLoRA")
    train.pop("dataset", None)
    train.update(
        ckpt_name="(none)", diffusers_model=model.name, run_name=run_name, epochs=5000, resolution=64, min_bucket_resolution=64, max_bucket_resolution=128,
        mixed_precision="fp32", lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, lr_warmup=0.0,
        lr_scheduler="constant", max_steps=5000, checkpoint_every=4, validation_every=4, keep_checkpoints=2,
        validation_prompts="a red disc", validation_width=64, validation_height=64, validation_steps=2, pause_while_host_busy=False,
        compile=False, dataloader_workers=0,
    )  # fmt: skip
    prompt = {
        "1": {"class_type": "FinetuneLoadDataset", "inputs": load},
        "2": {"class_type": "FinetuneTrainLoRA", "inputs": train | {"dataset": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    comfy.run(prompt, timeout=120)


@pytest.mark.slow
def test_panel_controls_a_real_run(browser: Browser, comfy: ComfyClient, tmp_path: Path):
    """A tiny LoRA run queued through /prompt shows up live (websocket + poll); pause, resume and
    stop (after a confirmation) reach the routes and the badge follows the run's state."""
    run = "web-live-run"
    page = browser.page
    browser.open_panel()
    _queue_tiny_run(comfy, run)

    row = browser.row(run)
    expect(row).to_be_visible(timeout=POLL_WAIT_MS)
    row.click()
    chart = page.locator(".ft-detail .ft-chart")
    try:
        page.wait_for_function(
            "(n) => Number(document.querySelector('.ft-detail .ft-chart')?.dataset.points) >= n",
            arg=4,
            timeout=180_000,
        )
    except sync_api.TimeoutError:
        pytest.fail(
            f"the run did not log 4 steps; run.json: {json.dumps(comfy.get_json(f'/finetune/runs/{run}'))[:1500]}"
        )
    expect(row.locator(".ft-badge")).to_have_text("running")
    expect(row.locator(".ft-steps")).to_have_text(re.compile(r"\d+ / 5000"))
    expect(row.locator(".ft-eta")).to_have_text(re.compile(r"ETA (\d+h )?(\d+m )?\d+s"))
    expect(page.locator(".ft-detail .ft-external")).to_be_hidden()
    page.wait_for_function(
        "() => document.querySelector('.ft-sample-img')?.naturalWidth === 64", timeout=180_000
    )

    # Live updates come through the websocket: with the list and metrics routes cut off, the
    # step and the chart still advance.
    cut = re.compile(r"/finetune/runs(/[^/?]+/metrics)?(\?.*)?$")
    page.route(cut, lambda route: route.abort())
    step_now = int(row.locator(".ft-steps").inner_text().split(" / ")[0])
    points_now = int(chart.get_attribute("data-points"))
    page.wait_for_function(
        """([run, step, points]) => {
            const text = document.querySelector(`.ft-run[data-run="${run}"] .ft-steps`).textContent;
            const drawn = Number(document.querySelector('.ft-detail .ft-chart').dataset.points);
            return parseInt(text, 10) > step && drawn > points;
        }""",
        arg=[run, step_now, points_now],
        timeout=120_000,
    )
    # The poll meanwhile reports the failure in red, and recovers once the routes answer again.
    panel_error = page.locator(".ft-panel-error")
    expect(panel_error).to_contain_text("Could not load the runs", timeout=POLL_WAIT_MS)
    page.unroute(cut)
    expect(panel_error).to_be_hidden(timeout=POLL_WAIT_MS)

    buttons = {a: page.locator(f".ft-detail .ft-{a}") for a in ("pause", "resume", "stop")}
    with page.expect_response(_post(run, "pause")) as paused:
        buttons["pause"].click()
    assert paused.value.status == 200
    expect(row.locator(".ft-badge")).to_have_text("paused", timeout=POLL_WAIT_MS)
    expect(buttons["pause"]).to_be_disabled()
    expect(buttons["resume"]).to_be_enabled()

    with page.expect_response(_post(run, "resume")) as resumed:
        buttons["resume"].click()
    assert resumed.value.status == 200
    expect(row.locator(".ft-badge")).to_have_text("running", timeout=POLL_WAIT_MS)

    # Stop asks first: cancelling sends nothing.
    stops: list[str] = []
    page.on("request", lambda r: _post(run, "stop")(r) and stops.append(r.url))
    buttons["stop"].click()
    page.get_by_role("button", name="Cancel").click()
    expect(row.locator(".ft-badge")).to_have_text("running")
    assert stops == []
    buttons["stop"].click()
    with page.expect_response(_post(run, "stop")) as stopped:
        page.get_by_role("button", name="Confirm").click()
    assert stopped.value.status == 200
    assert json.loads(stopped.value.text())["state"] in ("stopping", "stopped")
    expect(row.locator(".ft-badge")).to_have_text("stopped", timeout=60_000)
    expect(buttons["stop"]).to_be_disabled()
    expect(buttons["resume"]).to_be_enabled()
    assert comfy.get_json(f"/finetune/runs/{run}")["state"] == "stopped"
    points = int(chart.get_attribute("data-points"))
    assert points >= 4

    shot = browser.screenshot(tmp_path / "panel_run.png", keep="/tmp/finetune_panel_run.png")
    _assert_screenshot(shot)
    assert browser.errors == []
