// orchd operator page. Plain JavaScript, no build step, nothing loaded from elsewhere.
//
// The admin key is kept in sessionStorage (this tab only) and sent as X-API-Key. The live
// view is GET /v1/admin/live, an SSE stream read with fetch() (EventSource cannot send a
// header): one snapshot a second. Everything shown is set as text, never as markup.
"use strict";

const KEY_ITEM = "orchd.adminKey";
const HISTORY = 180; // GPU readings kept per series: 3 minutes at one a second
const GPU_SERIES = ["utilization", "vram_used", "power_w", "temperature_c"];
const RECENT_ROWS = 25; // recent tasks shown (the feed carries up to 100)

let key = sessionStorage.getItem(KEY_ITEM) || "";
let feed = null; // the AbortController of the running live feed
let signedIn = false;
let snapshot = null;
const gpuHistory = new Map(); // GPU index -> {series name -> [values]}
let playground = null; // {taskId, controller} while a playground task runs

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ small helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const num = (v, digits = 0) =>
  v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US", {
    minimumFractionDigits: digits, maximumFractionDigits: digits,
  });
const gib = (b) => (b === null || b === undefined ? "–" : (b / 2 ** 30).toFixed(1));
const clientId = (taskId) => (taskId.includes("/") ? taskId.slice(taskId.indexOf("/") + 1) : taskId);
const randomId = () => Array.from(crypto.getRandomValues(new Uint8Array(6)),
  (b) => b.toString(16).padStart(2, "0")).join("");

function headers(extra) {
  return { "X-API-Key": key, ...(extra || {}) };
}

async function api(method, path, body) {
  const init = { method, headers: headers(), cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, init);
  let data = null;
  const text = await r.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = { message: text }; }
  }
  if (!r.ok) {
    const why = (data && (data.message || (data.error && data.error.message))) || r.statusText;
    throw new Error(`${r.status} ${why}`);
  }
  return data;
}

function notice(text, bad) {
  const n = $("notice");
  n.textContent = text;
  n.className = bad ? "notice bad" : "notice";
  n.hidden = false;
}

// ------------------------------------------------------------------ signing in and out

function showLogin(error) {
  signedIn = false;
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = error || "";
  $("key").focus();
}

function onSignedIn() {
  if (signedIn) return;
  signedIn = true;
  sessionStorage.setItem(KEY_ITEM, key);
  $("login").hidden = true;
  $("app").hidden = false;
  $("login-error").textContent = "";
  fetch("/version", { cache: "no-store" })
    .then((r) => r.json())
    .then((v) => {
      $("version").textContent = `v${v.version} · ${String(v.git_sha).slice(0, 12)} · Python ${v.python}`;
    })
    .catch(() => {});
}

function signOut(error) {
  if (feed) feed.abort();
  feed = null;
  key = "";
  sessionStorage.removeItem(KEY_ITEM);
  showLogin(error);
}

// ------------------------------------------------------------------ the live feed

function setConn(text, live) {
  const c = $("conn");
  c.textContent = text;
  c.className = live ? "conn live" : "conn down";
}

function handleFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  const body = JSON.parse(data.join("\n"));
  if (event === "live") {
    render(body);
    setConn("live", true);
  } else if (event === "error") {
    setConn(`scheduler: ${body.message}`, false);
  }
}

async function runFeed() {
  const ctl = new AbortController();
  feed = ctl;
  let backoff = 1000;
  while (feed === ctl) {
    try {
      const r = await fetch("/v1/admin/live", {
        headers: headers({ Accept: "text/event-stream" }), signal: ctl.signal, cache: "no-store",
      });
      if (r.status === 401 || r.status === 403) {
        const body = await r.json().catch(() => ({}));
        signOut(body.message || `refused (${r.status})`);
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      onSignedIn();
      backoff = 1000;
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          handleFrame(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
      setConn("reconnecting", false);
    } catch (e) {
      if (ctl.signal.aborted) return;
      setConn(`reconnecting (${e.message})`, false);
    }
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

// ------------------------------------------------------------------ rendering

function render(s) {
  snapshot = s;
  $("updated").textContent = new Date(s.at_ms).toLocaleTimeString();
  const ready = $("ready");
  ready.textContent = !s.admitting ? "shutting down" : s.ready ? "ready" : "not ready";
  ready.className = s.ready ? "badge ok" : "badge bad";
  const q = s.queue;
  $("queue-depth").textContent = `${num(q.depth)} / ${num(q.capacity)}`;
  $("queue-detail").textContent =
    `interactive ${num(q.by_priority.interactive)} · batch ${num(q.by_priority.batch)}`;
  $("streams-open").textContent = num(s.streams.open);
  $("tasks-started").textContent = num(s.totals.started);
  $("tokens-out").textContent = num(s.totals.tokens_out);
  $("tokens-rate").textContent = num(s.pools.reduce((a, p) => a + p.tokens_per_s, 0), 1);
  $("rejected").textContent = `${num(s.totals.rejected)} · ${num(s.totals.canceled)}`;
  renderGpus(s.gpus);
  renderPools(s.pools);
  renderTasks(s.tasks, s.tasks_total);
  renderRecent(s.recent);
  renderModels(s.pools);
}

function replaceRows(table, rows, emptyText, columns) {
  const tbody = $(table).tBodies[0];
  if (!rows.length) rows = [el("tr", { class: "empty" }, el("td", { colspan: columns, text: emptyText }))];
  tbody.replaceChildren(...rows);
}

function sparkline(values, max, cls) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${HISTORY} 40`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  const pts = [];
  const offset = HISTORY - values.length;
  values.forEach((v, i) => {
    if (v === null || v === undefined || !max) return;
    const y = 38 - 36 * Math.min(1, Math.max(0, v / max));
    pts.push(`${offset + i},${y.toFixed(1)}`);
  });
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke-width", "1.5");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  line.setAttribute("class", cls);
  svg.append(line);
  return svg;
}

function renderGpus(gpus) {
  const box = $("gpus");
  if (!gpus.length) {
    box.replaceChildren(el("p", { class: "muted", text: "NVML sees no GPU on this host." }));
    return;
  }
  const cards = gpus.map((g) => {
    let h = gpuHistory.get(g.index);
    if (g.history) {
      h = {};
      for (const f of GPU_SERIES) h[f] = g.history[f].slice(-HISTORY);
    } else {
      h = h || Object.fromEntries(GPU_SERIES.map((f) => [f, []]));
      for (const f of GPU_SERIES) {
        h[f].push(g[f]);
        if (h[f].length > HISTORY) h[f].shift();
      }
    }
    gpuHistory.set(g.index, h);
    const util = g.utilization === null ? null : g.utilization * 100;
    const vramPct = g.vram_total ? (100 * g.vram_used) / g.vram_total : null;
    const owner = g.replica_id ? `replica ${g.replica_id}` : "no replica";
    return el("div", { class: "gpu", "data-index": g.index },
      el("div", { class: "title" },
        el("strong", { text: `GPU ${g.index} · ${g.name}` }),
        el("span", { class: "muted", text: owner })),
      el("div", { class: "figures" },
        el("div", {}, el("span", { class: "v util", text: `${num(util)} %` }), el("span", { class: "k", text: "utilization" })),
        el("div", {}, el("span", { class: "v vram", text: `${gib(g.vram_used)} / ${gib(g.vram_total)}` }),
          el("span", { class: "k", text: `VRAM GiB (${num(vramPct)} %)` })),
        el("div", {}, el("span", { class: "v power", text: `${num(g.power_w)} W` }), el("span", { class: "k", text: "power" })),
        el("div", {}, el("span", { class: "v temp", text: `${num(g.temperature_c)} °C` }), el("span", { class: "k", text: "temperature" }))),
      sparkline(h.utilization, 1, "line-util"),
      sparkline(h.vram_used, g.vram_total, "line-vram"),
      el("div", { class: "legend" },
        el("span", { class: "u", text: "— utilization" }), " ",
        el("span", { class: "m", text: "— VRAM" }),
        ` · last ${Math.round(h.utilization.length / 60 * 10) / 10} min`));
  });
  box.replaceChildren(...cards);
}

function ttft(r) {
  return r.ttft_p50_ms === null ? "–" : `${num(r.ttft_p50_ms, 1)} · ${num(r.ttft_p99_ms, 1)}`;
}

function renderPools(pools) {
  const rows = [];
  for (const p of pools) {
    const act = (action, label, disabled, handler) =>
      el("button", {
        type: "button", class: "small", "data-action": action, "data-pool": p.id,
        disabled, onclick: handler,
      }, label);
    rows.push(el("tr", { class: "pool", "data-pool": p.id },
      el("td", { text: `pool ${p.id}` }),
      el("td", { class: `state-${p.state}`, text: p.state }),
      el("td", { text: p.engine }),
      el("td", { text: `${p.engine_version || "?"} (v${p.version})` }),
      el("td", { text: p.model_ref }),
      el("td", { text: `${p.active} / ${p.slots}` }),
      el("td", { class: "queued", text: `${p.queued.interactive} · ${p.queued.batch}` }),
      el("td", { text: num(p.tokens_per_s, 1) }),
      el("td", { text: "" }),
      el("td", { class: "actions" },
        act("drain", "Drain", p.draining, () => drain(p)),
        act("undrain", "Undrain", !p.draining, () => undrain(p)),
        act("reload", "Reload", p.reloading, () => reload(p)))));
    for (const r of p.replicas) {
      rows.push(el("tr", { class: "replica", "data-replica": r.id },
        el("td", { text: r.id }),
        el("td", { class: `state-${r.state}`, text: r.state }),
        el("td", { text: r.engine }),
        el("td", { text: r.engine_version || "?" }),
        el("td", { class: "why", text: r.reason || (r.devices ? `devices ${r.devices}` : "") }),
        el("td", { text: `${r.active} / ${r.slots}` }),
        el("td", { text: "" }),
        el("td", { class: "rate", text: num(r.tokens_per_s, 1) }),
        el("td", { class: "ttft", text: ttft(r) }),
        el("td", {})));
    }
  }
  replaceRows("pools", rows, "no pool", 10);
}

function renderTasks(tasks, total) {
  $("tasks-count").textContent = total > tasks.length ? `(${tasks.length} of ${total})` : `(${total})`;
  const rows = tasks.map((t) => el("tr", { "data-task": t.task_id },
    el("td", { text: clientId(t.task_id) }),
    el("td", { class: "muted", text: t.api_key_id }),
    el("td", { class: `state-${t.state}`, text: t.state }),
    el("td", { text: t.client ? `streaming on frontend ${t.frontend}` : t.stream === "none" ? "none" : t.stream }),
    el("td", { text: t.replica_id ? `${t.pool_id} / ${t.replica_id}` : t.pool_id }),
    el("td", { text: t.priority }),
    el("td", { text: num(t.queue_ms) }),
    el("td", { text: t.running_ms === null ? "–" : num(t.running_ms) }),
    el("td", {}, el("button", {
      type: "button", class: "small danger", "data-action": "cancel", "data-task": t.task_id,
      onclick: () => cancelTask(t),
    }, "Cancel"))));
  replaceRows("tasks", rows, "no task is queued or running", 9);
}

function renderRecent(recent) {
  $("recent-count").textContent =
    recent.length > RECENT_ROWS ? `(newest ${RECENT_ROWS} of ${recent.length})` : "";
  const rows = recent.slice(0, RECENT_ROWS).map((t) => el("tr", { "data-task": t.task_id },
    el("td", { text: new Date(t.ended_at_ms).toLocaleTimeString() }),
    el("td", { text: clientId(t.task_id) }),
    el("td", { class: "muted", text: t.api_key_id }),
    el("td", {
      class: `outcome state-${t.error_code ? "error" : t.outcome === "canceled" ? "draining" : "ready"}`,
      text: t.error_code ? `${t.outcome} (${t.error_code})` : t.outcome,
    }),
    el("td", { text: t.replica_id ? `${t.pool_id} / ${t.replica_id}` : t.pool_id }),
    el("td", { text: num(t.tokens_out) }),
    el("td", { text: num(t.queue_ms, 1) }),
    el("td", { text: t.ttft_ms === null ? "–" : num(t.ttft_ms, 1) }),
    el("td", { text: num(t.total_ms, 1) }),
    el("td", { text: t.tokens_per_s === null ? "–" : num(t.tokens_per_s, 1) })));
  replaceRows("recent", rows, "no task has ended yet", 10);
}

function renderModels(pools) {
  const select = $("pg-model");
  const wanted = pools
    .filter((p) => p.supported_workloads.includes("completion"))
    .map((p) => ({ value: JSON.stringify({ engine: p.engine, model_ref: p.model_ref }),
      label: `${p.model_ref} (${p.engine}, pool ${p.id})` }));
  const seen = new Set();
  const options = wanted.filter((o) => !seen.has(o.value) && seen.add(o.value));
  const now = Array.from(select.options, (o) => o.value).join("\n");
  if (now === options.map((o) => o.value).join("\n")) return;
  const keep = select.value;
  select.replaceChildren(...options.map((o) => el("option", { value: o.value, text: o.label })));
  if (options.some((o) => o.value === keep)) select.value = keep;
}

// ------------------------------------------------------------------ actions

function confirmDialog(title, text, field) {
  const dlg = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-field-row").hidden = !field;
  if (field) {
    $("confirm-field-label").textContent = field.label;
    $("confirm-field").type = field.type || "text"; // before the value: "mock:x" is no number
    $("confirm-field").value = field.value;
  }
  return new Promise((resolve) => {
    const done = (value) => {
      $("confirm-form").onsubmit = null;
      $("confirm-no").onclick = null;
      dlg.onclose = null;
      if (dlg.open) dlg.close();
      resolve(value);
    };
    $("confirm-form").onsubmit = (e) => {
      e.preventDefault();
      done(field ? $("confirm-field").value : true);
    };
    $("confirm-no").onclick = () => done(null);
    dlg.onclose = () => done(null);
    dlg.showModal();
  });
}

async function act(what, fn) {
  try {
    const result = await fn();
    if (result) notice(`${what}: ${result}`, false);
  } catch (e) {
    notice(`${what} failed: ${e.message}`, true);
  }
}

async function drain(p) {
  const deadline = await confirmDialog(`Drain pool ${p.id}?`,
    "Nothing new is placed on it; running tasks may finish until the deadline, then end.",
    { label: "deadline (ms)", value: "30000", type: "number" });
  if (deadline === null) return;
  await act(`drain ${p.id}`, async () => {
    const r = await api("POST", `/v1/pools/${encodeURIComponent(p.id)}/drain`,
      { deadline_ms: Number(deadline) });
    return `draining, ${r.running} running`;
  });
}

async function undrain(p) {
  if ((await confirmDialog(`Undrain pool ${p.id}?`, "Its replicas take new tasks again.")) === null) return;
  await act(`undrain ${p.id}`, async () => {
    await api("POST", `/v1/pools/${encodeURIComponent(p.id)}/undrain`);
    return "serving again";
  });
}

async function reload(p) {
  const ref = await confirmDialog(`Reload pool ${p.id}?`,
    "Every replica loads the model beside the one it serves; all switch at once, or none does.",
    { label: "new model ref", value: p.model_ref });
  if (ref === null) return;
  notice(`reload ${p.id}: loading ${ref}…`, false);
  await act(`reload ${p.id}`, async () => {
    const r = await api("POST", `/v1/pools/${encodeURIComponent(p.id)}/reload`, { new_model_ref: ref });
    return `now serving ${r.model_ref} (v${r.version})`;
  });
}

async function cancelTask(t) {
  const id = clientId(t.task_id);
  const ok = await confirmDialog(`Cancel task ${id}?`,
    `Task ${id} of key ${t.api_key_id} (${t.state}) ends now with reason canceled.`);
  if (ok === null) return;
  await act(`cancel ${id}`, async () => {
    const tenant = t.api_key_id ? `?tenant=${encodeURIComponent(t.api_key_id)}` : "";
    await api("POST", `/v1/tasks/${encodeURIComponent(id)}/cancel${tenant}`);
    return "canceled";
  });
}

// ------------------------------------------------------------------ the playground

async function runPlayground(event) {
  event.preventDefault();
  if (playground || !$("pg-model").value) return;
  const { engine, model_ref } = JSON.parse($("pg-model").value);
  const taskId = `ui-${randomId()}`;
  const out = $("pg-out");
  out.textContent = "";
  const stats = $("pg-stats");
  const controller = new AbortController();
  playground = { taskId, controller };
  $("pg-run").disabled = true;
  $("pg-stop").disabled = false;
  const t0 = performance.now();
  let first = null;
  let tokens = 0;
  try {
    await api("POST", "/v1/tasks", {
      task_id: taskId, session_id: `ui-${randomId()}`, workload: "completion", engine, model_ref,
      ctx: 2048, priority: "interactive", max_tokens: Number($("pg-max").value) || 64,
      deadline_ms: 300000, prompt: $("pg-prompt").value,
    });
    stats.textContent = `${taskId}: queued`;
    const r = await fetch(`/v1/tasks/${taskId}/stream`, {
      headers: headers({ Accept: "text/event-stream" }), signal: controller.signal, cache: "no-store",
    });
    if (!r.ok) throw new Error(`stream: HTTP ${r.status}`);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, i);
        buf = buf.slice(i + 2);
        let ev = "";
        let data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) ev = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
        }
        if (!data) continue;
        const d = JSON.parse(data);
        const ms = performance.now() - t0;
        if (ev === "started") {
          stats.textContent = `${taskId}: on ${d.pool_id} / ${d.replica_id}`;
        } else if (ev === "token") {
          if (first === null) first = ms;
          tokens += 1;
          out.append(d.t);
          const rate = tokens > 1 ? (1000 * (tokens - 1)) / (ms - first) : 0;
          stats.textContent = `${taskId}: ${tokens} tokens · TTFT ${num(first)} ms · ${num(rate, 1)} tokens/s`;
        } else if (ev === "end") {
          stats.textContent = `${taskId}: ${d.reason}, ${d.tokens_out} tokens` +
            (first === null ? "" : ` · TTFT ${num(first)} ms`) + ` · ${num(ms)} ms in all`;
        } else if (ev === "error") {
          stats.textContent = `${taskId}: error ${d.code}: ${d.message}`;
        }
      }
    }
  } catch (e) {
    if (!controller.signal.aborted) stats.textContent = `${taskId}: ${e.message}`;
  } finally {
    playground = null;
    $("pg-run").disabled = false;
    $("pg-stop").disabled = true;
  }
}

async function stopPlayground() {
  if (!playground) return;
  const { taskId } = playground;
  try {
    await api("POST", `/v1/tasks/${taskId}/cancel`);
  } catch (e) {
    $("pg-stats").textContent = `${taskId}: cancel failed: ${e.message}`;
  }
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    key = $("key").value.trim();
    if (!key) return;
    $("login-error").textContent = "";
    runFeed();
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("playground").addEventListener("submit", runPlayground);
  $("pg-stop").addEventListener("click", stopPlayground);
  if (key) runFeed();
  else showLogin("");
});
