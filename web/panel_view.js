/**
 * The panel's DOM: a list of runs (state badge, progress bar, step/total, loss, samples/s, ETA)
 * and, for the selected run, the loss chart, the latest validation image and the run buttons.
 * It reads a RunStore and calls back into its owner for selection and commands; it never fetches.
 */

import {
  allowedActions,
  formatDuration,
  formatLoss,
  formatLr,
  formatRate,
  formatSteps,
  progressFraction,
} from "./finetune_api.js";
import { drawLossChart } from "./loss_chart.js";

/** Create an element with a class and optional text. */
function el(tag, className, text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  return node;
}

export class PanelView {
  /**
   * @param {HTMLElement} root the element ComfyUI gave the sidebar tab
   * @param {{store: import("./run_store.js").RunStore,
   *          sampleUrl: (run: string, ref: string) => string|null,
   *          onSelect: (name: string) => void,
   *          onAction: (name: string, action: string) => void,
   *          onRefresh: () => void}} options
   */
  constructor(root, { store, sampleUrl, onSelect, onAction, onRefresh }) {
    this.host = root;
    this.store = store;
    this.sampleUrl = sampleUrl;
    this.onSelect = onSelect;
    this.onAction = onAction;
    /** @type {string|null} */
    this.selected = null;
    /** @type {Map<string, HTMLElement>} */
    this.rows = new Map();

    this.root = el("div", "ft-panel");
    const header = el("div", "ft-header");
    header.append(el("span", "ft-title", "Fine-tune runs"));
    const refresh = el("button", "ft-button ft-refresh", "Refresh");
    refresh.title = "Reload the runs from the server";
    refresh.addEventListener("click", () => onRefresh());
    header.append(refresh);
    this.panelError = el("div", "ft-error ft-panel-error");
    this.list = el("ul", "ft-runs");
    this.list.setAttribute("role", "listbox");
    this.empty = el("div", "ft-empty", "No runs yet. Queue a Train node and it appears here.");
    this.detail = this.#buildDetail();
    this.root.append(header, this.panelError, this.list, this.empty, this.detail);
    root.replaceChildren(this.root);

    this.resizeObserver = new ResizeObserver(() => this.#drawChart());
    this.resizeObserver.observe(this.chart);
  }

  destroy() {
    this.resizeObserver.disconnect();
    this.root.remove();
  }

  /** Re-render from the store; cheap enough for every websocket event (a handful of runs). */
  update() {
    const { store } = this;
    this.panelError.textContent = store.panelError ?? "";
    this.panelError.hidden = !store.panelError;

    for (const [name, row] of this.rows) {
      if (!store.runs.has(name)) {
        row.remove();
        this.rows.delete(name);
      }
    }
    let index = 0;
    for (const run of store.runs.values()) {
      let row = this.rows.get(run.name);
      if (!row) {
        row = this.#buildRow(run.name);
        this.rows.set(run.name, row);
      }
      this.#fillRow(row, run);
      // Move a row only when it is out of place: moving one under the pointer would eat a click.
      const here = this.list.children[index];
      if (here !== row) this.list.insertBefore(row, here ?? null);
      index += 1;
    }
    this.empty.hidden = store.runs.size > 0;
    this.#fillDetail();
  }

  select(name) {
    this.selected = name;
    this.update();
  }

  #buildRow(name) {
    const row = el("li", "ft-run");
    row.dataset.run = name;
    row.setAttribute("role", "option");
    row.tabIndex = 0;
    const head = el("div", "ft-run-head");
    head.append(el("span", "ft-run-name", name), el("span", "ft-badge"));
    const bar = el("div", "ft-progress");
    bar.append(el("div", "ft-progress-fill"));
    const stats = el("div", "ft-run-stats");
    stats.append(
      el("span", "ft-steps"),
      el("span", "ft-loss"),
      el("span", "ft-speed"),
      el("span", "ft-eta"),
    );
    row.append(head, bar, stats, el("div", "ft-run-message"));
    row.addEventListener("click", () => this.onSelect(name));
    row.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        this.onSelect(name);
      }
    });
    return row;
  }

  #fillRow(row, run) {
    const state = run.state ?? "unknown";
    row.dataset.state = state;
    row.setAttribute("aria-selected", String(run.name === this.selected));
    const badge = row.querySelector(".ft-badge");
    badge.textContent = state;
    badge.className = `ft-badge ft-state-${state}`;
    const done = state === "finished" ? 1 : progressFraction(run.step, run.total_steps);
    const bar = row.querySelector(".ft-progress");
    bar.dataset.fraction = done.toFixed(4);
    bar.querySelector(".ft-progress-fill").style.width = `${(done * 100).toFixed(1)}%`;
    row.querySelector(".ft-steps").textContent = formatSteps(run.step, run.total_steps);
    row.querySelector(".ft-loss").textContent = `loss ${formatLoss(run.loss)}`;
    row.querySelector(".ft-speed").textContent = formatRate(run.samples_per_s);
    row.querySelector(".ft-eta").textContent =
      state === "running" || state === "paused" ? `ETA ${formatDuration(run.eta_s)}` : "";
    const message = row.querySelector(".ft-run-message");
    const error = this.store.errorFor(run.name);
    message.textContent = error ?? run.message ?? "";
    message.classList.toggle("ft-error", Boolean(error));
    message.hidden = !message.textContent;
  }

  #buildDetail() {
    const detail = el("section", "ft-detail");
    this.detailTitle = el("div", "ft-detail-title");
    const actions = el("div", "ft-actions");
    this.buttons = {};
    for (const [action, label] of [
      ["pause", "Pause"],
      ["resume", "Resume"],
      ["stop", "Stop"],
    ]) {
      const button = el("button", `ft-button ft-${action}`, label);
      button.dataset.action = action;
      button.addEventListener("click", () => this.selected && this.onAction(this.selected, action));
      this.buttons[action] = button;
      actions.append(button);
    }
    this.detailError = el("div", "ft-error ft-detail-error");
    this.detailNote = el(
      "div",
      "ft-caption ft-external",
      "Another process (a command-line run) trains this run: watch it here, control it there.",
    );
    this.chart = el("canvas", "ft-chart");
    this.chartCaption = el("div", "ft-caption");
    this.sample = el("figure", "ft-sample");
    this.sampleImg = el("img", "ft-sample-img");
    this.sampleImg.alt = "latest validation image";
    this.sampleCaption = el("figcaption", "ft-caption");
    this.sample.append(this.sampleImg, this.sampleCaption);
    detail.append(this.detailTitle, actions, this.detailNote, this.detailError, this.chart, this.chartCaption, this.sample);
    return detail;
  }

  #fillDetail() {
    const run = this.selected ? this.store.runs.get(this.selected) : null;
    this.detail.hidden = !run;
    if (!run) return;
    this.detail.dataset.run = run.name;
    this.detailTitle.textContent = run.name;
    const allowed = allowedActions(run);
    for (const [action, button] of Object.entries(this.buttons)) button.disabled = !allowed[action];

    const error = this.store.errorFor(run.name);
    this.detailError.textContent = error ?? "";
    this.detailError.hidden = !error;
    this.detailNote.hidden = !run.external;

    this.#drawChart();
    const parts = [`lr ${formatLr(run.lr)}`];
    if (Number.isFinite(run.epoch)) parts.push(`epoch ${run.epoch}`);
    parts.push("line: EMA 0.9, dots: raw");
    this.chartCaption.textContent = parts.join(" · ");

    const ref = this.store.samples.get(run.name);
    const url = ref ? this.sampleUrl(run.name, ref) : null;
    this.sample.hidden = !url;
    // Only a new URL reloads the image, so a progress event does not make it flicker.
    if (url && this.sampleImg.dataset.src !== url) {
      this.sampleImg.dataset.src = url;
      this.sampleImg.src = url;
    }
    const step = run.latest_sample_step ?? /step0*(\d+)/.exec(ref ?? "")?.[1];
    this.sampleCaption.textContent = step !== undefined ? `latest sample, step ${step}` : "latest sample";
  }

  #drawChart() {
    if (!this.selected || this.detail.hidden) return;
    drawLossChart(this.chart, this.store.lossPoints(this.selected));
  }
}
