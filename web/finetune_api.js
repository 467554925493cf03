/**
 * The pack's HTTP routes under /finetune/ and the formatters the panel shows numbers with.
 *
 * Requests go through ComfyUI's `api.fetchApi`, which adds the `/api` prefix, the base path of a
 * ComfyUI served under a sub-path and the user header of a multi-user server.
 */

/** States in which a run still holds (or waits for) a worker. */
export const ACTIVE_STATES = new Set(["queued", "running", "paused", "stopping"]);

/**
 * Which run commands make sense for a run; the server re-checks and answers an error otherwise.
 * Resume also restarts a stopped, interrupted or failed run from its last checkpoint. A run that
 * another process trains (`external`, e.g. a CLI run) is read-only here.
 * @param {{state?: string, external?: boolean}} run
 * @returns {{pause: boolean, resume: boolean, stop: boolean}}
 */
export function allowedActions(run) {
  const state = run?.state;
  if (!state || run.external) return { pause: false, resume: false, stop: false };
  return {
    pause: state === "running",
    resume: ["paused", "stopped", "interrupted", "failed"].includes(state),
    stop: state === "queued" || state === "running" || state === "paused",
  };
}

export class FinetuneClient {
  /** @param {{fetchApi: Function, apiURL: Function}} api ComfyUI's api object. */
  constructor(api) {
    this.api = api;
  }

  /** @returns {Promise<object[]>} run summaries, as `GET /finetune/runs` lists them. */
  async listRuns() {
    const body = await this.#request("/finetune/runs");
    return Array.isArray(body?.runs) ? body.runs : [];
  }

  /** @returns {Promise<object>} one run: state, config and plan. */
  getRun(name) {
    return this.#request(`/finetune/runs/${encodeURIComponent(name)}`);
  }

  /**
   * metrics.jsonl rows logged after step `since`, oldest first (`{run, rows}` from the route).
   * @returns {Promise<object[]>}
   */
  async metrics(name, since = 0) {
    const body = await this.#request(
      `/finetune/runs/${encodeURIComponent(name)}/metrics?since=${Math.max(0, since | 0)}`,
    );
    const rows = body?.rows ?? body?.metrics;
    return Array.isArray(rows) ? rows : [];
  }

  /**
   * Ask the server to pause, resume or stop a run.
   * @param {string} name
   * @param {"pause"|"resume"|"stop"} action
   */
  command(name, action) {
    return this.#request(`/finetune/runs/${encodeURIComponent(name)}/${action}`, { method: "POST" });
  }

  /**
   * A browser URL for a sample image, whatever form the server gave it in: a route path
   * ("/finetune/runs/r/samples/f.png", "/api/finetune/…"), an absolute URL, or a file in the
   * run's samples folder ("step00200-0.png", "samples/step00200-0.png" or a full file path).
   * @returns {string|null}
   */
  sampleUrl(name, ref) {
    if (!ref || typeof ref !== "string") return null;
    if (/^(https?:|data:|blob:)/.test(ref)) return ref;
    if (/^\/(api\/)?finetune\//.test(ref)) return this.api.apiURL(ref);
    const file = ref.split(/[\\/]/).pop();
    return this.api.apiURL(
      `/finetune/runs/${encodeURIComponent(name)}/samples/${encodeURIComponent(file)}`,
    );
  }

  async #request(path, init = undefined) {
    const response = await this.api.fetchApi(path, init);
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    if (!response.ok) {
      // The routes answer {"error": "..."}; anything else (a proxy page) is shown truncated.
      const detail = body?.error ?? body?.message ?? (text.slice(0, 200) || response.statusText);
      throw new Error(`${init?.method ?? "GET"} ${path}: ${response.status} ${detail}`);
    }
    return body;
  }
}

// Formatters: every one answers "—" for a value that is missing or not a finite number.

const DASH = "—";

function finite(x) {
  return typeof x === "number" && Number.isFinite(x);
}

/**
 * Seconds as "9s", "2m 05s" or "1h 02m 05s".
 * @param {number|null|undefined} seconds
 */
export function formatDuration(seconds) {
  if (!finite(seconds) || seconds < 0) return DASH;
  const total = Math.round(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const pad = (n) => String(n).padStart(2, "0");
  if (h > 0) return `${h}h ${pad(m)}m ${pad(s)}s`;
  if (m > 0) return `${m}m ${pad(s)}s`;
  return `${s}s`;
}

/** A loss with four decimals, or in exponent notation when it is tiny or huge. */
export function formatLoss(x) {
  if (!finite(x)) return DASH;
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toFixed(4);
}

/** A learning rate such as "1.00e-4". */
export function formatLr(x) {
  if (!finite(x)) return DASH;
  return x === 0 ? "0" : x.toExponential(2).replace("e+", "e");
}

/** Samples per second such as "3.21/s". */
export function formatRate(x) {
  if (!finite(x)) return DASH;
  return `${x.toFixed(x >= 100 ? 0 : 2)}/s`;
}

/** "420 / 1000" (or "— / 1000" before the first step). */
export function formatSteps(step, total) {
  return `${finite(step) ? step : DASH} / ${finite(total) && total > 0 ? total : DASH}`;
}

/** Fraction of the run done, clamped to 0..1 (0 when the total is unknown). */
export function progressFraction(step, total) {
  if (!finite(step) || !finite(total) || total <= 0) return 0;
  return Math.min(1, Math.max(0, step / total));
}
