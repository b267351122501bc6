// Live GRPO training chart on the "UniPic2 GRPO Trainer" node: mean reward per term and loss per step, and the
// latest samples. The server sends one "unipic2.grpo" message per training step (nodes/training_nodes.py).
// History lives in node.properties, so it survives a page reload (the frontend restores the workflow) and is
// saved with the workflow. Plain ES module, no build step; works with the legacy and the current frontend.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "unipic2.grpo";
const NODE_TYPE = "UniPic2GRPOTrainer";
const CHART_HEIGHT = 200;
const PREVIEW_HEIGHT = 72;
const EXTRA_HEIGHT = CHART_HEIGHT + PREVIEW_HEIGHT + 24;
const COLOURS = ["#4e9de0", "#f0a030", "#50c050", "#e05050", "#b080e0", "#a08060"];

function historyOf(node) {
  return Array.isArray(node.properties?.unipic2_history) ? node.properties.unipic2_history : [];
}

// Put the run's history (sent whole with every step) on its node; messages for unknown or deleted nodes, or for
// other node types, are ignored.
function record(detail) {
  const node = detail && app.graph?.getNodeById(Number(detail.node));
  if (!node || node.type !== NODE_TYPE || !Array.isArray(detail.history)) return;
  node.properties = node.properties ?? {};
  node.properties.unipic2_history = detail.history;
  node.properties.unipic2_total = detail.total;
  if (typeof detail.preview === "string") node.properties.unipic2_preview = detail.preview;
  node.setDirtyCanvas?.(true, true);
}

// A stored message replaces the node's chart only if it is not older than what the node already shows.
function catchUp(detail) {
  const node = detail && app.graph?.getNodeById(Number(detail.node));
  const shown = node ? historyOf(node) : [];
  const stored = Array.isArray(detail?.history) ? detail.history : [];
  if (stored.length && (!shown.length || stored[stored.length - 1].step >= shown[shown.length - 1].step)) {
    record(detail);
  }
}

function previewImage(node) {
  const url = node.properties?.unipic2_preview;
  if (!url) return null;
  if (node.unipic2Image?.src !== url) {
    node.unipic2Image = new Image();
    node.unipic2Image.onload = () => node.setDirtyCanvas?.(true, true);
    node.unipic2Image.src = url;
  }
  return node.unipic2Image.complete ? node.unipic2Image : null;
}

function drawSeries(ctx, series, box, colour) {
  const [x, y, w, h, low, high] = box;
  const points = series.map((v, i) => [i, v]).filter(([, v]) => typeof v === "number");
  if (!points.length) return;
  ctx.strokeStyle = colour;
  ctx.fillStyle = colour;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach(([i, v], n) => {
    const px = x + (series.length > 1 ? (w * i) / (series.length - 1) : w / 2);
    const py = y + h - (h * (v - low)) / (high - low || 1);
    n ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
  });
  ctx.stroke();
}

function drawPanel(ctx, title, named, x, y, w, h) {
  const values = Object.values(named).flat().filter((v) => typeof v === "number");
  const low = values.length ? Math.min(...values) : 0;
  const high = values.length ? Math.max(...values) : 1;
  ctx.strokeStyle = "#555";
  ctx.strokeRect(x, y, w, h);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ccc";
  ctx.fillText(`${title}  [${low.toPrecision(4)} .. ${high.toPrecision(4)}]`, x + 4, y + 12);
  Object.entries(named).forEach(([name, series], n) => {
    const colour = COLOURS[n % COLOURS.length];
    ctx.fillStyle = colour;
    ctx.fillText(name, x + w - 130, y + 12 + 12 * n);
    drawSeries(ctx, series, [x + 4, y + 18, w - 8, h - 24, low, high], colour);
  });
}

function drawTraining(node, ctx) {
  if (node.flags?.collapsed) return;
  const history = historyOf(node);
  const width = node.size[0] - 20;
  let y = node.size[1] - EXTRA_HEIGHT + 8;
  const last = history[history.length - 1];
  ctx.save();
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#ddd";
  ctx.fillText(last ? `step ${last.step}/${node.properties.unipic2_total ?? "?"}  reward ${last.rewards?.total?.[0]?.toFixed?.(4) ?? "-"}`
                    : "GRPO: no training steps yet", 10, y + 4);
  y += 10;
  const names = Object.keys(last?.rewards ?? {});
  const rewards = Object.fromEntries(names.map((name) => [name, history.map((h) => h.rewards?.[name]?.[0])]));
  drawPanel(ctx, "reward", rewards, 10, y, width, CHART_HEIGHT / 2 - 4);
  drawPanel(ctx, "loss", { loss: history.map((h) => h.loss), kl: history.map((h) => h.kl) }, 10,
            y + CHART_HEIGHT / 2, width, CHART_HEIGHT / 2 - 4);
  const image = previewImage(node);
  if (image) {
    const scale = Math.min(PREVIEW_HEIGHT / image.height, width / image.width);
    ctx.drawImage(image, 10, y + CHART_HEIGHT + 2, image.width * scale, image.height * scale);
  }
  ctx.restore();
}

app.registerExtension({
  name: "UniPic2.Training",
  async setup() {
    api.addEventListener(EVENT, (event) => record(event.detail));
    // After a page reload mid-run the websocket was away for a moment: take the server's latest message per node.
    try {
      const response = await api.fetchApi(`/unipic2/messages/${EVENT}`);
      if (response.ok) (await response.json()).forEach(catchUp);
    } catch (error) {
      console.warn("UniPic2: could not fetch the latest training state", error);
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    // The legacy frontend copies LGraphNode's methods onto node classes only after this hook: fall back to it.
    const computeSize = nodeType.prototype.computeSize ?? globalThis.LiteGraph.LGraphNode.prototype.computeSize;
    nodeType.prototype.computeSize = function (...args) {
      const size = computeSize.apply(this, args);
      return [Math.max(size[0], 420), size[1] + EXTRA_HEIGHT];
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      this.size = this.computeSize();
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {  // a saved workflow may hold a smaller size
      const result = onConfigure?.apply(this, args);
      const [width, height] = this.computeSize();
      this.size = [Math.max(this.size[0], width), Math.max(this.size[1], height)];
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...args) {
      const result = onDrawForeground?.apply(this, [ctx, ...args]);
      drawTraining(this, ctx);
      return result;
    };
  },
});
