// Live GRPO training chart on the "UniPic2 GRPO Trainer" node: mean reward per term and loss per step, and the
// latest samples. The server sends each training step's new point, only to the client that queued the run
// (nodes/host/messages.py). The chart lives in node.properties, so it survives a page reload (the frontend restores the
// workflow) and is saved with the workflow. A workflow records the prompt ids it queued (graph.extra) and takes
// points only from those runs: another workflow with a trainer of the same node id never gets them. A chart belongs
// to one run (node.properties.unipic2_prompt): a later run of the node keeps its points up to the step it started at
// (a resumed run continues the chart, a fresh one, at step 0, replaces it) and an earlier run's points stay off.
// Plain ES module, no build step, for the current frontend (ComfyUI 0.3.75's).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "unipic2.grpo";
const NODE_TYPE = "UniPic2GRPOTrainer";
const MAX_POINTS = 2000;  // per chart, as many as the server keeps per run
const MAX_PROMPTS = 64;  // prompt ids a workflow remembers
const MAX_RUNS = 16;  // runs this page remembers, to show them in a workflow opened later
const CHART_HEIGHT = 200;
const PREVIEW_HEIGHT = 72;
const EXTRA_HEIGHT = CHART_HEIGHT + PREVIEW_HEIGHT + 24;
const COLOURS = ["#4e9de0", "#f0a030", "#50c050", "#e05050", "#b080e0", "#a08060"];

// What this page received per run (live points and catch-ups), by "<prompt id>/<node id>".
const runs = new Map();
let showPending = false;

function historyOf(node) {
  return Array.isArray(node.properties?.unipic2_history) ? node.properties.unipic2_history : [];
}

function queuedPrompts(graph) {
  return Array.isArray(graph?.extra?.unipic2_prompts) ? graph.extra.unipic2_prompts : [];
}

// One point per step, in step order (a catch-up after live messages repeats some). A long run is thinned, every
// second point dropped (the last kept), so the saved workflow stays small while the chart still spans the run.
function merged(history, points) {
  const byStep = new Map(history.map((point) => [point.step, point]));
  points.forEach((point) => byStep.set(point.step, point));
  let all = [...byStep.values()].sort((a, b) => a.step - b.step);
  while (all.length > MAX_POINTS) all = all.filter((_, i) => (all.length - 1 - i) % 2 === 0);
  return all;
}

// An execution id is a node id, or on the current frontend a path through subgraphs: "5:3" is node 3 inside the
// subgraph of node 5 of the root graph.
export function nodeByExecutionId(graph, id) {
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById?.(Number(part)) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

// A run's points go on its trainer node only in a graph that queued the run, and not over a later run's chart.
function show(graph, run) {
  const queued = queuedPrompts(graph);
  const order = queued.indexOf(run.prompt);
  if (order < 0) return;
  const node = nodeByExecutionId(graph, run.node);
  if (!node || node.type !== NODE_TYPE) return;
  node.properties = node.properties ?? {};
  let history = historyOf(node);
  if (node.properties.unipic2_prompt !== run.prompt) {
    if (queued.indexOf(node.properties.unipic2_prompt) > order) return;
    history = history.filter((point) => point.step <= run.start);
    node.properties.unipic2_prompt = run.prompt;
  }
  node.properties.unipic2_history = merged(history, run.points);
  node.properties.unipic2_total = run.total;
  if (run.preview) node.properties.unipic2_preview = run.preview;
  node.setDirtyCanvas?.(true, true);
}

// A live message ({prompt_id, node, start_step, total, point, preview}) or a catch-up ({..., history}); anything
// else is ignored.
function receive(message, points) {
  if (typeof message?.prompt_id !== "string" || message.node == null || !Number.isInteger(message.start_step)
      || message.start_step < 0 || !Array.isArray(points) || !points.length
      || !points.every((point) => typeof point?.step === "number")) return;
  const key = `${message.prompt_id}/${message.node}`;
  const run = runs.get(key)
      ?? { prompt: message.prompt_id, node: String(message.node), start: message.start_step, points: [] };
  runs.delete(key);
  runs.set(key, run);  // the map's order is the eviction order
  if (runs.size > MAX_RUNS) runs.delete(runs.keys().next().value);
  run.points = merged(run.points, points);
  run.total = message.total;
  if (typeof message.preview === "string") run.preview = message.preview;
  show(app.graph, run);
}

function showRuns(graph) {
  runs.forEach((run) => show(graph, run));
}

// The points the socket missed (page load, reconnect) come from the server's runs of this client.
async function catchUp() {
  try {
    const response = await api.fetchApi(`/unipic2/messages/${EVENT}?clientId=${encodeURIComponent(api.clientId)}`);
    if (response.ok) (await response.json()).forEach((message) => receive(message, message?.history));
  } catch (error) {
    console.warn("UniPic2: could not fetch the training runs of this page", error);
  }
}

// api.clientId is set when the socket's first status message arrives (a reloaded tab gets its old id back).
function onceConnected(callback) {
  const check = () => {
    if (!api.clientId) return;
    api.removeEventListener("status", check);
    callback();
  };
  api.addEventListener("status", check);
  check();
}

// Remember the ids of the prompts this graph queues with a trainer in them, in the graph (saved with it).
function recordQueuedPrompts() {
  const queuePrompt = api.queuePrompt;
  api.queuePrompt = async function (number, data, ...rest) {
    const graph = app.graph;
    const response = await queuePrompt.call(this, number, data, ...rest);
    const trains = Object.values(data?.output ?? {}).some((node) => node?.class_type === NODE_TYPE);
    if (trains && typeof response?.prompt_id === "string") {
      graph.extra = graph.extra ?? {};
      graph.extra.unipic2_prompts = [...queuedPrompts(graph), response.prompt_id].slice(-MAX_PROMPTS);
      showRuns(graph);  // points that arrived before the answer
    }
    return response;
  };
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
  // every reward term of the chart, first seen first: a resumed run may add one
  const names = [...new Set(history.flatMap((h) => Object.keys(h.rewards ?? {})))];
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
    recordQueuedPrompts();
    api.addEventListener(EVENT, (event) => receive(event.detail, [event.detail?.point]));
    api.addEventListener("reconnected", catchUp);
    onceConnected(catchUp);
  },
  loadedGraphNode() {  // called per node of a workflow being opened: show its runs once all are in
    if (showPending) return;
    showPending = true;
    queueMicrotask(() => {
      showPending = false;
      showRuns(app.graph);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const computeSize = nodeType.prototype.computeSize;
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
