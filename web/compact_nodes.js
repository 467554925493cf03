/**
 * Compact nodes: the pack's advanced widgets stay off the canvas until the user asks for them.
 *
 * The schema marks expert settings `advanced`. ComfyUI's frontend (1.49) copies that flag only
 * into `widget.options.advanced`: the node panel lists such widgets under "advanced inputs" and the
 * Vue node renderer hides them behind a button, but the canvas renderer tests `widget.advanced`,
 * so a Train node drew all of its ~70 widgets. LiteGraph has the rest of the mechanism (the node's
 * `showAdvanced`, saved with the graph, and "Show Advanced" / "Hide Advanced" in the node menu)
 * except that its layout still reserves room for hidden widgets. For the pack's nodes this module
 * sets `widget.advanced` (and on a seed's control widget), lays out only the widgets shown, and
 * fits the node's height when they change. Widget order and values are untouched, so saved graphs
 * load as before.
 */

import { app } from "../../scripts/app.js";

const PACK_PREFIX = "Finetune";

/** Whether `node` is one of this pack's nodes. */
export function isPackNode(node) {
  const type = node?.comfyClass ?? node?.type ?? "";
  return typeof type === "string" && type.startsWith(PACK_PREFIX);
}

/** Mark the schema's advanced widgets (and the widgets linked to them) advanced on the canvas.
 * Returns how many widgets are advanced. */
export function markAdvanced(node) {
  let count = 0;
  for (const widget of node.widgets ?? []) {
    if (!widget.options?.advanced) continue;
    for (const w of [widget, ...(widget.linkedWidgets ?? [])]) {
      if (!w.advanced) count += 1;
      w.advanced = true;
    }
  }
  return count;
}

/** The widgets drawn now: not hidden, and not advanced unless the node shows advanced ones. */
export function shownWidgets(node) {
  return (node.widgets ?? []).filter((w) => !w.hidden && !(w.advanced && !node.showAdvanced));
}

/** Fit the node's height to the widgets it shows (its width stays the user's). */
export function fitHeight(node) {
  const [, height] = node.computeSize();
  node.setSize([node.size[0], height]);
  node.setDirtyCanvas?.(true, true);
}

/** Make `node` compact: advanced widgets hidden from the layout until "Show Advanced". */
export function makeCompact(node) {
  if (!markAdvanced(node) && !node.widgets?.some((w) => w.advanced)) return false;
  // LiteGraph lays out every widget that is not `hidden`; leave hidden advanced ones out too, or
  // the shown widgets keep the gaps and the node its full height.
  node.getLayoutWidgets = function () {
    return shownWidgets(this);
  };
  const toggle = node.toggleAdvanced;
  node.toggleAdvanced = function (...args) {
    const result = toggle.apply(this, args);
    fitHeight(this); // LiteGraph only grows a node here; hiding should shrink it again
    return result;
  };
  return true;
}

app.registerExtension({
  name: "comfyui-finetune.compact-nodes",
  nodeCreated(node) {
    if (isPackNode(node) && makeCompact(node)) fitHeight(node);
  },
  loadedGraphNode(node) {
    // A saved size came from a frontend that drew every widget: fit it to what is shown now.
    // Output nodes keep theirs: the room under their widgets is for the images they show.
    const output = node.constructor?.nodeData?.output_node;
    if (isPackNode(node) && !output && node.widgets?.some((w) => w.advanced) && !node.showAdvanced) {
      fitHeight(node);
    }
  },
});
