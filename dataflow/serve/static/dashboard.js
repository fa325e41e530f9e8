// dataflow playground and live dashboard. Plain JavaScript, no build step, no CDN.
//
// Streams completions through the server's own OpenAI-compatible POST /v1/completions
// (stream: true; fetch + ReadableStream, server-sent events parsed below); #stop aborts
// the fetch, so the server sees the disconnect and cancels the request. Live figures come
// from GET /v1/stats/stream (the same SSE framing), the picture from GET /v1/graphs.
// The page holds no secret: when the server answers 401 it asks for an API key, kept in
// this tab's sessionStorage and sent as "Authorization: Bearer <key>".
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";
const KEY_STORE = "dataflow.api_key";

const state = {
  graphs: new Map(), // model name -> /v1/graphs entry
  model: null, // the model #send streams from
  view: null, // the graph drawn and shown in #stats (follows #model; #graph_select)
  latest: new Map(), // model name -> its latest /v1/stats entry
  statsAbort: null,
  genAbort: null,
  authWaiters: [],
};

class AuthNeeded extends Error {}

// -- HTTP ------------------------------------------------------------------------------
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const res = await fetch(path, opts);
  if (res.status === 401) {
    askForKey(await errorMessage(res));
    throw new AuthNeeded("the server needs an API key");
  }
  return res;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) {
    /* not JSON */
  }
  return "HTTP " + res.status;
}

function askForKey(message) {
  $("#auth").hidden = false;
  $("#auth_error").textContent = message || "";
  $("#api_key").focus();
}

function keyGiven() {
  return new Promise((resolve) => state.authWaiters.push(resolve));
}

// Server-sent events from a fetch response: yields each event's data string.
async function* sseData(res, signal) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""));
        if (data.length) yield data.join("\n");
      }
      if (signal && signal.aborted) break;
    }
  } finally {
    reader.releaseLock();
  }
}

// -- graphs ----------------------------------------------------------------------------
async function loadGraphs() {
  const res = await api("v1/graphs");
  if (!res.ok) throw new Error(await errorMessage(res));
  const body = await res.json();
  const select = $("#model");
  const previous = select.value;
  select.textContent = "";
  state.graphs.clear();
  for (const g of body.data) {
    state.graphs.set(g.name, g);
  }
  // Generation graphs first (the playground streams text from them), then the rest.
  const entries = [...state.graphs.values()];
  const gen = entries.filter((g) => g.generate !== null || g.streaming);
  for (const g of gen.length ? gen : entries) {
    const opt = document.createElement("option");
    opt.value = g.name;
    opt.textContent = g.name;
    select.appendChild(opt);
  }
  if (previous && state.graphs.has(previous)) select.value = previous;
  const view = $("#graph_select");
  view.textContent = "";
  for (const g of entries) {
    const opt = document.createElement("option");
    opt.value = g.name;
    opt.textContent = g.name;
    view.appendChild(opt);
  }
  view.hidden = entries.length < 2;
  selectModel(select.value);
}

function selectModel(name) {
  state.model = name;
  $("#graph_select").value = name;
  showGraph(name);
}

function showGraph(name) {
  state.view = name;
  const g = state.graphs.get(name);
  if (g) drawGraph(g);
  buildRows(g);
  const latest = state.latest.get(name);
  if (latest) renderStats(latest);
}

function el(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// A layered drawing, left to right: each node's layer is its longest path from the
// source (given by the server, from the topological order); nodes of a layer stack.
function drawGraph(g) {
  const svg = $("#graph");
  svg.textContent = "";
  const W = 168, H = 54, GAPX = 70, GAPY = 26, R = 16, PAD = 14;
  const layers = new Map();
  for (const n of g.nodes) {
    if (!layers.has(n.layer)) layers.set(n.layer, []);
    layers.get(n.layer).push(n);
  }
  const depth = Math.max(...layers.keys()) + 1;
  // A long pipeline gets the page's whole width (the panels stack).
  document.querySelector("main").classList.toggle("wide", depth > 3);
  const tallest = Math.max(...[...layers.values()].map((l) => l.length));
  // Edges that skip a layer run along a lane above the nodes instead of behind them.
  const layerOf = new Map(g.nodes.map((n) => [n.name, n.layer]));
  const skips = g.edges.some((e) => layerOf.get(e.to) - layerOf.get(e.from) > 1);
  const TOP = skips ? 28 : 0;
  const inner = PAD * 2 + tallest * H + (tallest - 1) * GAPY + 18;
  const height = TOP + inner;
  const x0 = PAD + 2 * R + GAPX;
  const width = x0 + depth * W + (depth - 1) * GAPX + GAPX + 2 * R + PAD;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);

  const defs = el("defs");
  const marker = el("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
  });
  marker.appendChild(el("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }));
  defs.appendChild(marker);
  svg.appendChild(defs);

  const pos = new Map();
  for (const [layer, nodes] of layers) {
    const total = nodes.length * H + (nodes.length - 1) * GAPY;
    nodes.forEach((n, i) => {
      const x = x0 + layer * (W + GAPX);
      const y = TOP + (inner - total) / 2 + i * (H + GAPY);
      pos.set(n.name, { x, y });
    });
  }
  const mid = TOP + inner / 2;
  const inX = PAD + R, outX = width - PAD - R;
  const edgeLayer = el("g", { class: "edges" });
  const nodeLayer = el("g", { class: "nodes" });
  svg.appendChild(edgeLayer);
  svg.appendChild(nodeLayer);

  const edge = (x1, y1, x2, y2, label, id) => {
    const dx = (x2 - x1) / 2;
    edgeLayer.appendChild(el("path", {
      d: `M ${x1} ${y1} C ${x1 + dx} ${y1}, ${x2 - dx} ${y2}, ${x2} ${y2}`,
      class: "edge", "marker-end": "url(#arrow)", "data-edge": id,
    }));
    if (label) {
      edgeLayer.appendChild(el("text", {
        x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "edge-label", "text-anchor": "middle",
      }, label));
    }
  };
  const src = pos.get(g.source), sink = pos.get(g.sink);
  edge(inX + R, mid, src.x, src.y + H / 2, "cap " + g.input_capacity, "input->" + g.source);
  for (const e of g.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    const id = e.from + "->" + e.to;
    if (layerOf.get(e.to) - layerOf.get(e.from) > 1) {
      const x1 = a.x + W / 2, y1 = a.y, x2 = b.x + W / 2, y2 = b.y, lane = PAD;
      edgeLayer.appendChild(el("path", {
        d: `M ${x1} ${y1} C ${x1} ${lane}, ${x1} ${lane}, ${x1 + 30} ${lane} ` +
          `L ${x2 - 30} ${lane} C ${x2} ${lane}, ${x2} ${lane}, ${x2} ${y2}`,
        class: "edge", "marker-end": "url(#arrow)", "data-edge": id,
      }));
      edgeLayer.appendChild(el("text", {
        x: (x1 + x2) / 2, y: lane - 4, class: "edge-label", "text-anchor": "middle",
      }, "cap " + e.capacity));
    } else {
      edge(a.x + W, a.y + H / 2, b.x, b.y + H / 2, "cap " + e.capacity, id);
    }
  }
  edge(sink.x + W, sink.y + H / 2, outX - R, mid, "", g.sink + "->output");

  for (const [x, label] of [[inX, "input"], [outX, "output"]]) {
    nodeLayer.appendChild(el("circle", { cx: x, cy: mid, r: R, class: "terminal" }));
    nodeLayer.appendChild(el("text", {
      x, y: mid + R + 13, "text-anchor": "middle", class: "terminal-label",
    }, label));
  }
  for (const n of g.nodes) {
    const p = pos.get(n.name);
    const group = el("g", { class: "node kind-" + n.kind, "data-node": n.name });
    group.appendChild(el("rect", { x: p.x, y: p.y, width: W, height: H, rx: 7, class: "box" }));
    group.appendChild(el("rect", {
      x: p.x, y: p.y + H - 5, width: 0, height: 5, class: "busy-bar",
    }));
    group.appendChild(el("text", {
      x: p.x + W / 2, y: p.y + 21, "text-anchor": "middle", class: "node-name",
    }, n.name));
    let where = n.placement === n.runs_on ? n.placement : `${n.placement}→${n.runs_on}`;
    if (n.replicas > 1) where += ` ×${n.replicas}`;
    group.appendChild(el("text", {
      x: p.x + W / 2, y: p.y + 39, "text-anchor": "middle", class: "node-kind",
    }, `${n.kind} · ${where}`));
    const title = el("title", {}, `${n.name}: ${n.label}`);
    group.appendChild(title);
    nodeLayer.appendChild(group);
  }
}

// -- stats -----------------------------------------------------------------------------
const COLUMNS = ["busy", "queue", "items_in", "items_out", "p50", "cancelled", "failed"];

function buildRows(g) {
  const body = $("#stats tbody");
  body.textContent = "";
  if (!g) return;
  for (const n of g.nodes) {
    const tr = document.createElement("tr");
    tr.dataset.node = n.name;
    const th = document.createElement("th");
    th.textContent = n.name;
    tr.appendChild(th);
    for (const col of COLUMNS) {
      const td = document.createElement("td");
      td.dataset.col = col;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function fmtSeconds(s) {
  if (!s) return "–";
  if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(1) + " ms";
  return s.toFixed(2) + " s";
}

function busyCell(td, fractions) {
  td.textContent = "";
  for (const f of fractions) {
    const wrap = document.createElement("span");
    wrap.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = (100 * f).toFixed(0) + "%";
    wrap.appendChild(fill);
    const label = document.createElement("span");
    label.className = "pct";
    label.textContent = (100 * f).toFixed(0) + "%";
    td.appendChild(wrap);
    td.appendChild(label);
  }
}

function renderStats(entry) {
  if (!entry || entry.model !== state.view) return;
  const req = entry.requests || {};
  for (const dd of document.querySelectorAll("#requests dd")) {
    const v = req[dd.dataset.counter];
    dd.textContent = v === undefined ? "–" : String(v);
  }
  $("#window").textContent = entry.window_s
    ? `(busy over the last ${entry.window_s.toFixed(1)} s)` : "";
  for (const [name, n] of Object.entries(entry.nodes || {})) {
    const tr = document.querySelector(`#stats tr[data-node="${CSS.escape(name)}"]`);
    if (!tr) continue;
    const cell = (col) => tr.querySelector(`td[data-col="${col}"]`);
    busyCell(cell("busy"), n.busy_window);
    cell("queue").textContent = `${n.queue.depth} / ${n.queue.capacity}`;
    cell("items_in").textContent = String(n.items_in);
    cell("items_out").textContent = String(n.items_out);
    cell("p50").textContent = fmtSeconds(n.service_p50_s);
    cell("cancelled").textContent = String(n.cancelled);
    cell("failed").textContent = String(n.failed);
    const mean = n.busy_window.reduce((a, b) => a + b, 0) / Math.max(1, n.busy_window.length);
    const box = document.querySelector(`#graph g[data-node="${CSS.escape(name)}"]`);
    if (box) {
      const rect = box.querySelector("rect.box");
      const bar = box.querySelector("rect.busy-bar");
      bar.setAttribute("width", (Number(rect.getAttribute("width")) * mean).toFixed(1));
      box.classList.toggle("working", mean > 0.05);
    }
  }
  const b = entry.bottleneck_window;
  $("#bottleneck").textContent = b ? "bottleneck: " + b.reason : "";
}

async function followStats() {
  for (;;) {
    const abort = new AbortController();
    state.statsAbort = abort;
    try {
      const res = await api("v1/stats/stream?interval=0.5", { signal: abort.signal });
      if (!res.ok) throw new Error(await errorMessage(res));
      $("#conn").textContent = "live";
      for await (const data of sseData(res, abort.signal)) {
        if (data === "[DONE]") break;
        const body = JSON.parse(data);
        if (body.error) throw new Error(body.error.message);
        for (const entry of body.data) {
          state.latest.set(entry.model, entry);
          if (entry.model === state.view) renderStats(entry);
        }
      }
    } catch (e) {
      if (e instanceof AuthNeeded) {
        $("#conn").textContent = "waiting for an API key";
        await keyGiven();
        continue;
      }
      $("#conn").textContent = "reconnecting…";
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// -- generation ------------------------------------------------------------------------
function requestBody() {
  const body = { model: state.model, prompt: $("#prompt").value, stream: true };
  const maxTokens = $("#max_tokens").value;
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const temperature = $("#temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  const seed = $("#seed").value;
  if (seed !== "") body.seed = Number(seed);
  return body;
}

function setRunning(running) {
  $("#send").disabled = running;
  $("#stop").disabled = !running;
  document.body.classList.toggle("generating", running);
}

async function send() {
  if (state.genAbort) return;
  const out = $("#output");
  const line = $("#output_stats");
  const err = $("#error");
  out.textContent = "";
  err.textContent = "";
  line.textContent = "waiting for the first token…";
  const abort = new AbortController();
  state.genAbort = abort;
  setRunning(true);
  const t0 = performance.now();
  let first = null, tokens = 0, outcome = "done";
  const show = () => {
    const now = performance.now();
    const parts = [`${tokens} tokens`];
    if (first !== null) {
      const span = (now - first) / 1000;
      if (tokens > 1 && span > 0) parts.push(`${((tokens - 1) / span).toFixed(1)} tokens/s`);
      parts.push(`first token ${(first - t0).toFixed(0)} ms`);
    }
    line.textContent = parts.join(" · ") + (outcome === "done" ? "" : ` · ${outcome}`);
  };
  try {
    const res = await api("v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
      signal: abort.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    for await (const data of sseData(res, abort.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.text) {
        if (first === null) first = performance.now();
        tokens += 1;
        const follow = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
        out.textContent += choice.text;
        if (follow) out.scrollTop = out.scrollHeight; // keep the newest text in view
        show();
      }
      if (choice && choice.finish_reason) outcome = "finished: " + choice.finish_reason;
    }
  } catch (e) {
    if (abort.signal.aborted) {
      outcome = "stopped";
    } else if (e instanceof AuthNeeded) {
      outcome = "needs an API key";
    } else {
      outcome = "failed";
      err.textContent = e.message;
    }
  } finally {
    state.genAbort = null;
    setRunning(false);
    show();
    out.dataset.state = outcome;
  }
}

function stop() {
  if (state.genAbort) state.genAbort.abort();
}

// -- start -----------------------------------------------------------------------------
async function start() {
  $("#send").addEventListener("click", send);
  $("#stop").addEventListener("click", stop);
  $("#model").addEventListener("change", (e) => selectModel(e.target.value));
  $("#graph_select").addEventListener("change", (e) => showGraph(e.target.value));
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send();
  });
  $("#auth").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("#api_key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("#auth").hidden = true;
    $("#auth_error").textContent = "";
    $("#api_key").value = "";
    const waiters = state.authWaiters.splice(0);
    for (const w of waiters) w();
  });
  for (;;) {
    try {
      await loadGraphs();
      break;
    } catch (e) {
      if (e instanceof AuthNeeded) {
        await keyGiven();
        continue;
      }
      $("#error").textContent = "cannot list the graphs: " + e.message;
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  document.body.dataset.ready = "1";
  followStats();
}

start();
