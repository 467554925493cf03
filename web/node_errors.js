/**
 * Node errors where the user looks: under the pack's node that refused something, in red.
 *
 * ComfyUI's frontend (1.49) outlines a node whose inputs /prompt refused and toasts "Load Dataset
 * rejected the value for folder", but the pack's one-sentence reason (which folder was searched,
 * what to choose instead) only appears behind "View details" in the errors panel. This module draws
 * that reason under the node, from the frontend's own error state: the validation errors /prompt
 * returned (`node_errors`, e.g. from a node's `validate_inputs`) and the last execution error.
 * The messages drawn are kept on the node as `finetuneErrors` (tests read them there).
 */

import { app } from "../../scripts/app.js";
import { isPackNode } from "./compact_nodes.js";

const COLOUR = "#ff6b6b";
const FONT = "12px sans-serif";
const LINE_HEIGHT = 15;
const MAX_CHARS = 400; // a "value not in list" error lists every file; the start says enough
// ComfyUI writes a custom validation failure's details as "<input name> - <message>".
const INPUT_PREFIX = " - ";

/** The text of one entry of `node_errors[id].errors`: the node's own message where it has one. */
export function validationText(error) {
  const input = error?.extra_info?.input_name;
  let text = String(error?.details || error?.message || "");
  if (input && text.startsWith(`${input}${INPUT_PREFIX}`)) text = text.slice(input.length + INPUT_PREFIX.length);
  return text.length > MAX_CHARS ? `${text.slice(0, MAX_CHARS - 1)}…` : text;
}

/**
 * The messages ComfyUI holds for the node with id `nodeId`, each once.
 * @param {string|number} nodeId
 * @param {{nodeErrors?: object|null, executionError?: object|null}} state
 */
export function errorMessages(nodeId, { nodeErrors, executionError }) {
  const id = String(nodeId);
  const messages = (nodeErrors?.[id]?.errors ?? []).map(validationText);
  if (executionError && String(executionError.node_id) === id) {
    messages.push(String(executionError.exception_message ?? "").trim());
  }
  return [...new Set(messages.filter(Boolean))];
}

/** Split `text` into lines no wider than `width` on the canvas context `ctx`. */
export function wrapText(ctx, text, width) {
  const lines = [];
  for (const paragraph of text.split("\n")) {
    let line = "";
    for (const word of paragraph.split(/\s+/).filter(Boolean)) {
      const candidate = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(candidate).width > width) {
        lines.push(line);
        line = word;
      } else {
        line = candidate;
      }
    }
    if (line) lines.push(line);
  }
  return lines;
}

function currentErrors(node) {
  return errorMessages(node.id, {
    nodeErrors: app.lastNodeErrors ?? app.canvas?.lastNodeErrors,
    executionError: app.lastExecutionError ?? app.canvas?.lastExecutionError,
  });
}

function drawErrors(ctx, node, messages) {
  ctx.save();
  ctx.font = FONT;
  ctx.fillStyle = COLOUR;
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  let y = node.size[1] + 8;
  for (const message of messages) {
    for (const line of wrapText(ctx, message, Math.max(node.size[0], 240))) {
      ctx.fillText(line, 0, y);
      y += LINE_HEIGHT;
    }
  }
  ctx.restore();
}

/** Draw the node's error messages under it on every frame. */
export function showErrorsUnder(node) {
  const draw = node.onDrawForeground;
  node.onDrawForeground = function (ctx, ...rest) {
    draw?.call(this, ctx, ...rest);
    this.finetuneErrors = currentErrors(this);
    if (this.finetuneErrors.length && !this.collapsed) drawErrors(ctx, this, this.finetuneErrors);
  };
}

app.registerExtension({
  name: "comfyui-finetune.node-errors",
  nodeCreated(node) {
    if (isPackNode(node)) showErrorsUnder(node);
  },
});
