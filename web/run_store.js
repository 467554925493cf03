/**
 * What the panel knows about runs: the summaries from `GET /finetune/runs`, the loss points of
 * each run, the latest sample and the last error, patched live by websocket events.
 *
 * The server's run folders are the source of truth; this store is a cache rebuilt from the routes
 * when the panel opens (or the page reloads) and refreshed by the slow poll. It dispatches a
 * "change" event after every update.
 */

export class RunStore extends EventTarget {
  /** @type {Map<string, object>} run name -> summary (fields as the runs route sends them) */
  runs = new Map();
  /** @type {Map<string, Map<number, number>>} run name -> step -> loss */
  #losses = new Map();
  /** @type {Map<string, number>} run name -> last step read from the metrics route */
  #fetchedThrough = new Map();
  /** @type {Map<string, string>} run name -> latest sample reference (URL or file name) */
  samples = new Map();
  /** @type {Map<string, string>} run name -> error event or refused command (see errorFor) */
  errors = new Map();
  /** @type {string|null} error of the panel itself (server unreachable, ...) */
  panelError = null;

  /**
   * Replace the list with the route's answer. A live event can be newer than run.json, so a
   * summary never moves back to an earlier step while the run keeps its state.
   * @param {object[]} list
   */
  setRuns(list) {
    const next = new Map();
    for (const run of list) {
      if (!run || typeof run.name !== "string") continue;
      const old = this.runs.get(run.name);
      // The run manager names the planned step count `total`; the events too.
      const merged = { ...run, total_steps: run.total_steps ?? run.total };
      if (old && old.state === run.state && (old.step ?? -1) > (run.step ?? -1)) {
        for (const key of ["step", "loss", "lr", "samples_per_s", "eta_s", "epoch"]) {
          if (old[key] !== undefined) merged[key] = old[key];
        }
      }
      if (run.latest_sample) this.samples.set(run.name, run.latest_sample);
      next.set(run.name, merged);
    }
    this.runs = next;
    this.#changed();
  }

  /** @returns {boolean} whether the run is known (an event for an unknown run asks for a refresh) */
  has(name) {
    return this.runs.has(name);
  }

  /** `finetune.progress` {run, step, total, loss, lr, samples_per_s, eta_s, epoch} */
  applyProgress(ev) {
    const run = this.runs.get(ev.run);
    if (!run) return;
    Object.assign(run, {
      step: ev.step,
      total_steps: ev.total ?? run.total_steps,
      loss: ev.loss,
      lr: ev.lr,
      samples_per_s: ev.samples_per_s,
      eta_s: ev.eta_s,
      epoch: ev.epoch ?? run.epoch,
    });
    if (run.state === "queued") run.state = "running";
    this.#addLoss(ev.run, ev.step, ev.loss);
    this.#changed(ev.run);
  }

  /** `finetune.state` {run, state, message} */
  applyState(ev) {
    const run = this.runs.get(ev.run);
    if (!run) return;
    run.state = ev.state;
    run.message = ev.message ?? "";
    // A run that starts again starts with a clean slate.
    if (ev.state === "running" || ev.state === "queued") this.errors.delete(ev.run);
    this.#changed(ev.run);
  }

  /** `finetune.sample` {run, step, urls} */
  applySample(ev) {
    const urls = Array.isArray(ev.urls) ? ev.urls : [];
    if (urls.length === 0) return;
    this.samples.set(ev.run, urls[urls.length - 1]);
    const run = this.runs.get(ev.run);
    if (run) run.latest_sample_step = ev.step;
    this.#changed(ev.run);
  }

  /** `finetune.checkpoint` {run, step, file} */
  applyCheckpoint(ev) {
    const run = this.runs.get(ev.run);
    if (!run) return;
    run.latest_checkpoint = ev.file;
    run.latest_checkpoint_step = ev.step;
    this.#changed(ev.run);
  }

  /**
   * The message to show in red for a run: the last error event or refused command, else the
   * message of a failed run.
   * @returns {string|null}
   */
  errorFor(name) {
    const error = this.errors.get(name);
    if (error) return error;
    const run = this.runs.get(name);
    return run?.state === "failed" ? run.message || "the run failed" : null;
  }

  /** `finetune.error` {run, message}, or a command the server refused. */
  setError(name, message) {
    if (message) this.errors.set(name, message);
    else this.errors.delete(name);
    this.#changed(name);
  }

  setPanelError(message) {
    if (this.panelError === (message || null)) return;
    this.panelError = message || null;
    this.#changed();
  }

  /**
   * Rows from the metrics route (or any rows with step and loss).
   * @param {string} name
   * @param {object[]} rows
   */
  addMetrics(name, rows) {
    let last = this.#fetchedThrough.get(name) ?? 0;
    for (const row of rows) {
      this.#addLoss(name, row.step, row.loss);
      if (Number.isFinite(row.step) && row.step > last) last = row.step;
    }
    this.#fetchedThrough.set(name, last);
    this.#changed(name);
  }

  /** The step to ask the metrics route `since` (live points do not count: events may be sparse). */
  fetchedThrough(name) {
    return this.#fetchedThrough.get(name) ?? 0;
  }

  /**
   * @param {string} name
   * @returns {{step: number, loss: number}[]} sorted by step
   */
  lossPoints(name) {
    const losses = this.#losses.get(name);
    if (!losses) return [];
    return [...losses.entries()].sort((a, b) => a[0] - b[0]).map(([step, loss]) => ({ step, loss }));
  }

  #addLoss(name, step, loss) {
    if (!Number.isFinite(step) || typeof loss !== "number") return;
    let losses = this.#losses.get(name);
    if (!losses) this.#losses.set(name, (losses = new Map()));
    // Keyed by step: a resumed run redoing steps overwrites them instead of doubling them.
    losses.set(step, loss);
  }

  #changed(name = null) {
    this.dispatchEvent(new CustomEvent("change", { detail: { name } }));
  }
}
