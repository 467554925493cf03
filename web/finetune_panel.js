/**
 * comfyui-finetune's sidebar tab: the training runs, live.
 *
 * On open (and after a page reload) the panel loads everything from the server's routes; the
 * websocket events `finetune.*` update it live, and a slow poll catches whatever an event missed
 * (a dropped socket, a run started by another client) while the tab is open and the page visible.
 */

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { FinetuneClient } from "./finetune_api.js";
import { PanelView } from "./panel_view.js";
import { RunStore } from "./run_store.js";

const TAB_ID = "comfyui-finetune";
const POLL_MS = 5000;
const SELECTED_KEY = "comfyui-finetune.selected-run";
const METRICS_ERROR = "Could not load the metrics";

/** Owns the store, the websocket listeners, the poll and (while the tab is open) the view. */
class PanelController {
  /**
   * @param {{client: FinetuneClient, confirm: (title: string, message: string) => Promise<boolean>}} deps
   */
  constructor({ client, confirm }) {
    this.client = client;
    this.confirm = confirm;
    this.store = new RunStore();
    /** @type {PanelView|null} */
    this.view = null;
    this.timer = null;
    this.refreshing = null;
    this.selected = sessionStorage.getItem(SELECTED_KEY);
    this.store.addEventListener("change", () => this.view?.update());
    this.onVisibility = () => {
      if (document.visibilityState === "visible") this.refresh();
    };
  }

  /** Listen to the server's `finetune.*` events for the page's lifetime. */
  listen(apiObject) {
    const on = (type, handler) =>
      apiObject.addEventListener(type, (event) => {
        const detail = event.detail ?? {};
        // An event for a run the list does not have yet (queued elsewhere): reload the list.
        if (!this.store.has(detail.run)) {
          if (this.view) this.refresh();
          return;
        }
        handler(detail);
      });
    on("finetune.progress", (d) => this.store.applyProgress(d));
    on("finetune.state", (d) => this.store.applyState(d));
    on("finetune.sample", (d) => this.store.applySample(d));
    on("finetune.checkpoint", (d) => this.store.applyCheckpoint(d));
    on("finetune.error", (d) => this.store.setError(d.run, d.message || "error"));
    // After a reconnect the events in between are lost: read the routes again.
    apiObject.addEventListener("reconnected", () => this.view && this.refresh());
  }

  /** The sidebar tab was opened: build the view into `element` and start polling. */
  mount(element) {
    // Vue may hand the same element again when the sidebar re-renders: keep the running view.
    if (this.view && this.view.host === element) return;
    this.unmount();
    this.view = new PanelView(element, {
      store: this.store,
      sampleUrl: (run, ref) => this.client.sampleUrl(run, ref),
      onSelect: (name) => this.select(name),
      onAction: (name, action) => this.command(name, action),
      onRefresh: () => this.refresh(),
    });
    this.view.selected = this.selected;
    this.view.update();
    this.refresh();
    this.timer = setInterval(() => {
      if (document.visibilityState === "visible") this.refresh();
    }, POLL_MS);
    document.addEventListener("visibilitychange", this.onVisibility);
  }

  /** The sidebar tab was closed: stop polling and drop the view (the store stays). */
  unmount() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    document.removeEventListener("visibilitychange", this.onVisibility);
    this.view?.destroy();
    this.view = null;
  }

  /** Reload the run list and the selected run's new metric rows. Concurrent calls share one. */
  refresh() {
    this.refreshing ??= this.#load().finally(() => {
      this.refreshing = null;
    });
    return this.refreshing;
  }

  async #load() {
    try {
      this.store.setRuns(await this.client.listRuns());
      this.store.setPanelError(null);
    } catch (error) {
      this.store.setPanelError(`Could not load the runs: ${error.message}`);
      return;
    }
    if (!this.selected || !this.store.has(this.selected)) {
      this.#select(pickDefault(this.store.runs));
    }
    await this.#loadMetrics(this.selected);
  }

  async #loadMetrics(name) {
    if (!name) return;
    try {
      this.store.addMetrics(name, await this.client.metrics(name, this.store.fetchedThrough(name)));
      if (this.store.errors.get(name)?.startsWith(METRICS_ERROR)) this.store.setError(name, null);
    } catch (error) {
      this.store.setError(name, `${METRICS_ERROR}: ${error.message}`);
    }
  }

  async select(name) {
    this.#select(name);
    await this.#loadMetrics(name);
  }

  #select(name) {
    this.selected = name;
    if (name) sessionStorage.setItem(SELECTED_KEY, name);
    this.view?.select(name);
  }

  /** Pause, resume or stop a run; stopping asks first. A refusal is shown in red. */
  async command(name, action) {
    if (action === "stop") {
      const ok = await this.confirm(
        "Stop training?",
        `Stop the run "${name}"? Checkpoints already written are kept, and it can be resumed later.`,
      );
      if (!ok) return;
    }
    try {
      const answer = await this.client.command(name, action);
      this.store.setError(name, null);
      if (answer?.state) this.store.applyState({ run: name, state: answer.state, message: answer.message });
    } catch (error) {
      this.store.setError(name, `Could not ${action} the run: ${error.message}`);
    }
    await this.refresh();
  }
}

/** The run to show first: an active one, else the most recently updated. */
function pickDefault(runs) {
  const list = [...runs.values()];
  const active = list.find((r) => ["running", "paused", "stopping", "queued"].includes(r.state));
  if (active) return active.name;
  list.sort((a, b) => (b.updated_at ?? 0) - (a.updated_at ?? 0));
  return list[0]?.name ?? null;
}

/** ComfyUI's own confirmation dialog when this frontend has one, else the browser's. */
async function confirmWithHost(title, message) {
  const dialog = app.extensionManager?.dialog;
  if (typeof dialog?.confirm === "function") {
    return (await dialog.confirm({ title, message, type: "default" })) === true;
  }
  return window.confirm(`${title}\n\n${message}`);
}

function addStylesheet() {
  const id = "ft-panel-css";
  if (document.getElementById(id)) return;
  const link = document.createElement("link");
  link.id = id;
  link.rel = "stylesheet";
  link.href = new URL("./finetune_panel.css", import.meta.url).href;
  document.head.append(link);
}

app.registerExtension({
  name: "comfyui-finetune.panel",
  async setup() {
    addStylesheet();
    const controller = new PanelController({ client: new FinetuneClient(api), confirm: confirmWithHost });
    controller.listen(api);
    app.extensionManager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-chart-line",
      title: "Finetune",
      tooltip: "Fine-tune runs: progress, loss, samples, stop",
      type: "custom",
      render: (element) => controller.mount(element),
      destroy: () => controller.unmount(),
    });
  },
});
