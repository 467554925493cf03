/**
 * The live loss chart: a plain <canvas> with the raw losses as dots, an EMA-smoothed line over
 * them and min/max labels on both axes. No dependencies.
 *
 * After each draw the canvas carries what it shows as data attributes (data-points,
 * data-last-step, data-y-min, data-y-max, data-ema-last) so tests and users' scripts can read the
 * chart without decoding pixels.
 */

import { formatLoss } from "./finetune_api.js";

const PAD = { left: 52, right: 8, top: 8, bottom: 20 };
const HEIGHT = 160;

/**
 * Exponential moving average, debiased as TensorBoard does so the first value is not pulled
 * towards zero.
 * @param {number[]} values
 * @param {number} weight smoothing in [0, 1): 0 returns the values, 0.99 is very smooth
 * @returns {number[]}
 */
export function emaSmooth(values, weight = 0.9) {
  const w = Math.min(Math.max(weight, 0), 0.999);
  const out = new Array(values.length);
  let acc = 0;
  let debias = 1;
  for (let i = 0; i < values.length; i++) {
    acc = acc * w + (1 - w) * values[i];
    debias *= w;
    out[i] = acc / (1 - debias);
  }
  return out;
}

/**
 * The plotted range of some values, padded so points do not sit on the frame. A flat series
 * (every value equal, or one value) gets a range around it instead of a zero-height range,
 * which would divide by zero when mapping values to pixels.
 * @param {number[]} values finite numbers, at least one
 * @returns {{lo: number, hi: number, min: number, max: number}}
 */
export function paddedRange(values) {
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const span = max - min;
  const pad = span > 0 ? span * 0.05 : Math.abs(min) * 0.05 || 0.05;
  return { lo: min - pad, hi: max + pad, min, max };
}

/**
 * Draw `points` into `canvas`, sized to the canvas' CSS width and the device pixel ratio.
 * @param {HTMLCanvasElement} canvas
 * @param {{step: number, loss: number}[]} points sorted by step; non-finite losses are skipped
 * @param {{smoothing?: number}} [options]
 * @returns {{points: number, emaLast: number|null}}
 */
export function drawLossChart(canvas, points, { smoothing = 0.9 } = {}) {
  const finitePoints = points.filter((p) => Number.isFinite(p.loss) && Number.isFinite(p.step));
  const width = Math.max(120, Math.round(canvas.clientWidth || canvas.parentElement?.clientWidth || 280));
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(HEIGHT * ratio);
  canvas.style.height = `${HEIGHT}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, HEIGHT);

  const style = getComputedStyle(canvas);
  const fg = style.color || "#ddd";
  const accent = style.getPropertyValue("--ft-accent").trim() || "#4aa3ff";
  const grid = style.getPropertyValue("--ft-grid").trim() || "rgba(128,128,128,0.35)";
  ctx.font = "10px sans-serif";
  ctx.fillStyle = fg;
  ctx.strokeStyle = grid;

  const plot = {
    x: PAD.left,
    y: PAD.top,
    w: width - PAD.left - PAD.right,
    h: HEIGHT - PAD.top - PAD.bottom,
  };
  ctx.strokeRect(plot.x + 0.5, plot.y + 0.5, plot.w, plot.h);

  if (finitePoints.length === 0) {
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("no loss logged yet", plot.x + plot.w / 2, plot.y + plot.h / 2);
    setData(canvas, { points: 0, lastStep: null, min: null, max: null, emaLast: null });
    return { points: 0, emaLast: null };
  }

  const losses = finitePoints.map((p) => p.loss);
  const smooth = emaSmooth(losses, smoothing);
  // The (debiased) EMA is a weighted mean of the raw losses, so it stays inside their range.
  const yr = paddedRange(losses);
  const firstStep = finitePoints[0].step;
  const lastStep = finitePoints[finitePoints.length - 1].step;
  const xSpan = lastStep - firstStep;
  // One step (or all at one step): centre it instead of dividing by a zero span.
  const xOf = (step) => plot.x + (xSpan > 0 ? ((step - firstStep) / xSpan) * plot.w : plot.w / 2);
  const yOf = (v) => plot.y + (1 - (v - yr.lo) / (yr.hi - yr.lo)) * plot.h;

  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.x, plot.y, plot.w, plot.h);
  ctx.clip();
  // Raw losses as dots: bigger while few, so a short run's points stay visible.
  const dot = finitePoints.length > 400 ? 2 : 4;
  ctx.globalAlpha = 0.5;
  ctx.fillStyle = accent;
  for (const p of finitePoints) {
    ctx.fillRect(xOf(p.step) - dot / 2, yOf(p.loss) - dot / 2, dot, dot);
  }
  ctx.globalAlpha = 1;
  ctx.strokeStyle = accent;
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  ctx.beginPath();
  finitePoints.forEach((p, i) => {
    const x = xOf(p.step);
    const y = yOf(smooth[i]);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.restore();

  // Axis labels: the data's own min and max (not the padded range) at their heights.
  const { min: dataMin, max: dataMax } = yr;
  ctx.fillStyle = fg;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.fillText(formatLoss(dataMax), plot.x - 4, yOf(dataMax));
  if (dataMax !== dataMin) ctx.fillText(formatLoss(dataMin), plot.x - 4, yOf(dataMin));
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(`step ${firstStep}`, plot.x, plot.y + plot.h + 4);
  if (xSpan > 0) {
    ctx.textAlign = "right";
    ctx.fillText(`${lastStep}`, plot.x + plot.w, plot.y + plot.h + 4);
  }

  const emaLast = smooth[smooth.length - 1];
  setData(canvas, { points: finitePoints.length, lastStep, min: dataMin, max: dataMax, emaLast });
  return { points: finitePoints.length, emaLast };
}

function setData(canvas, { points, lastStep, min, max, emaLast }) {
  canvas.dataset.points = String(points);
  canvas.dataset.lastStep = lastStep === null ? "" : String(lastStep);
  canvas.dataset.yMin = min === null ? "" : String(min);
  canvas.dataset.yMax = max === null ? "" : String(max);
  canvas.dataset.emaLast = emaLast === null ? "" : String(emaLast);
}
