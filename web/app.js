// refrag's page: ask (full context vs REFRAG, streamed side by side) and browse / compare / start runs.
// Plain DOM and fetch, no framework or CDN: it is served by `refrag.py serve` and works offline.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
};
const ms = (s) => (s == null ? "n/a" : (s * 1000).toFixed(1) + " ms");

let apiKey = localStorage.getItem("refrag-key") || "";
function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  return fetch(path, Object.assign({}, options, { headers }));
}
async function apiJson(path, options) {
  const r = await api(path, options);
  if (r.status === 401) $("#key-box").hidden = false;
  let body = null;
  try { body = await r.json(); } catch (e) { if (r.ok) throw e; }
  if (!r.ok) throw new Error((body && body.error && body.error.message) || `${r.status} ${r.statusText}`);
  return body;
}

// ---- tabs ----
for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === b);
    for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== b.dataset.tab;
    if (b.dataset.tab === "runs") loadRuns();
  });
}
$("#key-save").addEventListener("click", () => {
  apiKey = $("#api-key").value; localStorage.setItem("refrag-key", apiKey); init();
});

// ---- ask ----
function renderContext(box, context) {
  box.replaceChildren();
  if (!context || !context.length) { box.append(el("p", { class: "hint" }, "no passages in the prompt")); return; }
  box.append(el("p", { class: "legend hint" }, el("span", { class: "chunk expanded" }, "raw tokens (expanded)"),
    el("span", { class: "chunk compressed" }, "compressed: one embedding")));
  for (const p of context) {
    const div = el("div", { class: "passage" }, el("span", { class: "pid" }, "#" + p.id));
    for (const c of p.chunks) div.append(el("span", { class: "chunk " + (c.expanded ? "expanded" : "compressed") }, c.text));
    box.append(div);
  }
}

function renderStats(box, rec, clientFirst) {
  box.replaceChildren(
    el("span", {}, "TTFT ", el("b", { class: "ttft" }, ms(rec.ttft_s))), " · TTIT ", el("b", {}, ms(rec.ttit_s)),
    " · ", el("b", {}, rec.throughput_tok_s ? rec.throughput_tok_s.toFixed(1) : "n/a"), " tok/s · prompt ",
    el("b", {}, rec.prompt_positions), " positions (", rec.context_tokens, " context tokens",
    rec.mode === "refrag" ? `, ${rec.n_chunks} chunks, ${rec.expanded.length} expanded by ${rec.selection}` : "", ")",
    clientFirst != null ? ` · first text in the browser after ${clientFirst.toFixed(0)} ms` : "",
    " · reader ", el("b", { class: "reader" }, rec.decoder || "?"),
    rec.history_turns ? el("span", { class: "history" }, ` · history: ${rec.history_turns} earlier turn(s), ${rec.history}` +
      (rec.history === "compressed" && rec.mode === "refrag" ? ` (${rec.history_chunks} chunks)` : "")) : "",
    rec.draft === "lookup" ? el("span", { class: "drafting" }, " · drafting: ",
      el("b", { class: "passes" }, `${rec.generated_tokens} tokens in ${rec.decoder_steps} decoder passes`),
      ` (x${(rec.generated_tokens / rec.decoder_steps).toFixed(2)} tokens per pass, ` +
      `${rec.draft_accepted} of ${rec.draft_proposed} drafted tokens kept)`) : "");
}

// the conversation so far: each question with both columns' answers; each column sends its own answers back
const conversation = [];

function messagesFor(mode, question) {
  const msgs = [];
  for (const t of conversation) msgs.push({ role: "user", content: t.question }, { role: "assistant", content: t.answers[mode] || "" });
  return msgs.concat([{ role: "user", content: question }]);
}

function renderConversation() {
  $("#conversation").replaceChildren(...conversation.map((t) => el("li", { class: "turn" }, el("b", {}, t.question), " ",
    el("span", { class: "turn-answers" }, `REFRAG: ${t.answers.refrag || "-"} · full context: ${t.answers.full || "-"}`))));
}

async function ask(mode, question, settings) {
  const answer = $("#answer-" + mode), stats = $("#stats-" + mode), context = $("#context-" + mode);
  answer.textContent = ""; answer.classList.add("waiting"); stats.textContent = "waiting for the server"; context.replaceChildren();
  const refrag = Object.assign({ mode, return_context: true }, settings.refrag);
  const t0 = performance.now();
  answer.dataset.started = t0; delete answer.dataset.finished;  // when each request ran (the order is checked)
  let first = null;
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: "refrag", stream: true, max_tokens: settings.max_new,
        messages: messagesFor(mode, question), refrag }),
    });
    if (!r.ok) { const e = await r.json(); throw new Error((e.error && e.error.message) || r.statusText); }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).replace(/^data: /, ""); buf = buf.slice(cut + 2);
        if (line === "[DONE]") continue;
        const ev = JSON.parse(line);
        if (ev.error) throw new Error(ev.error.message);
        const delta = ev.choices[0].delta;
        if (delta.content) {
          if (first == null) { first = performance.now() - t0; stats.textContent = "streaming"; }
          answer.textContent += delta.content;
        }
        if (ev.refrag) {
          answer.classList.remove("waiting"); answer.textContent = ev.refrag.answer;
          renderStats(stats, ev.refrag, first); renderContext(context, ev.refrag.context);
        }
      }
    }
  } catch (e) {
    answer.classList.remove("waiting"); stats.replaceChildren(el("span", { class: "error" }, String(e.message || e)));
  }
  answer.dataset.finished = performance.now();
  return answer.textContent;
}

$("#ask-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("#question").value.trim();
  if (!q) return;
  const refrag = { topk: +$("#topk").value, k: +$("#k").value, p: +$("#p").value, history: $("#history").value,
    draft: $("#draft").value };
  if ($("#heuristic").value) refrag.heuristic = $("#heuristic").value;
  const settings = { max_new: +$("#max_new").value, refrag };
  // the server answers one request at a time: REFRAG is asked first and full context once REFRAG's answer is
  // done, so each browser time counts from its own request, not from the other's place in the queue
  $("#answer-full").textContent = ""; $("#context-full").replaceChildren();
  $("#stats-full").textContent = "asked once REFRAG has answered";
  (async () => {
    const answers = { refrag: await ask("refrag", q, settings) };
    answers.full = await ask("full", q, settings);
    conversation.push({ question: q, answers });
    renderConversation();
    $("#question").value = "";
  })();
});

$("#new-conversation").addEventListener("click", () => { conversation.length = 0; renderConversation(); });

// ---- runs ----
function chart(rows, key) {
  const pts = rows.filter((r) => typeof r[key] === "number" && typeof r.step === "number");
  if (pts.length < 1) return null;
  const W = 360, H = 150, L = 46, B = 22, xs = pts.map((r) => r.step), ys = pts.map((r) => r[key]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = (x) => L + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - L - 8);
  const Y = (y) => 8 + (y1 > y0 ? (y1 - y) / (y1 - y0) : 0.5) * (H - B - 8);
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.dataset.metric = key;
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text != null) n.textContent = text;
    svg.append(n); return n;
  };
  add("polyline", { points: pts.map((r) => `${X(r.step).toFixed(1)},${Y(r[key]).toFixed(1)}`).join(" ") });
  add("text", { x: 2, y: 12 }, y1.toPrecision(3)); add("text", { x: 2, y: H - B }, y0.toPrecision(3));
  add("text", { x: L, y: H - 6 }, "step " + x0); add("text", { x: W - 60, y: H - 6 }, "step " + x1);
  add("text", { x: W / 2, y: 12 }, key);
  return svg;
}

function table(value) {
  if (Array.isArray(value) && value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
    const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
    return el("table", {}, el("tr", {}, ...keys.map((k) => el("th", {}, k))),
      ...value.map((v) => el("tr", {}, ...keys.map((k) => el("td", {}, cell(v[k]))))));
  }
  if (value && typeof value === "object" && !Array.isArray(value)) {
    return el("table", {}, ...Object.entries(value).map(([k, v]) => el("tr", {}, el("th", {}, k),
      el("td", {}, typeof v === "object" && v !== null ? table(v) : cell(v)))));
  }
  return document.createTextNode(cell(value));
}
function cell(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  if (v == null) return "";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

async function openRun(path, slot) {
  const view = $("#run-" + slot);
  view.replaceChildren(el("p", { class: "hint" }, "loading " + path));
  try {
    const run = await apiJson("/api/run?path=" + encodeURIComponent(path));
    view.replaceChildren(el("h3", {}, run.path));
    view.dataset.path = run.path;
    const cfg = run["run_config.json"] || run["chain.json"] || run["results.json"];
    if (cfg && cfg.command) view.append(el("code", {}, cfg.command));
    const metrics = run["metrics.jsonl"];
    if (metrics && metrics.length) {
      const keys = [...new Set(metrics.flatMap((r) => Object.keys(r)))].filter((k) => k !== "step");
      for (const k of keys) { const c = chart(metrics, k); if (c) view.append(c); }
    }
    for (const name of ["results.json", "eval.json", "bench.json", "chain.json", "generate.json"]) {
      const v = run[name];
      if (!v) continue;
      view.append(el("h4", {}, name), table(name === "results.json" && v.results ? v.results
        : name === "bench.json" && v.records ? v.records : name === "chain.json" ? v.stages : v));
    }
    for (const p of run.plots) {  // fetched with the API key, shown from a blob
      const img = el("img", { class: "plot", alt: p });
      view.append(img);
      api("/api/file?path=" + encodeURIComponent(run.path + "/" + p)).then((r) => (r.ok ? r.blob() : null))
        .then((b) => { if (b) img.src = URL.createObjectURL(b); });
    }
  } catch (e) {
    view.replaceChildren(el("p", { class: "error" }, String(e.message || e)));
  }
}

async function loadRuns() {
  const list = $("#runs-list");
  try {
    const { runs } = await apiJson("/api/runs");
    list.replaceChildren(...runs.map((r) => el("li", { class: "run-item", "data-path": r.path },
      el("span", { class: "name", title: r.files.join(", ") }, r.path),
      el("button", { class: "open", onclick: () => openRun(r.path, "a") }, "open"),
      el("button", { class: "compare", onclick: () => openRun(r.path, "b") }, "compare"))));
    if (!runs.length) list.append(el("li", { class: "hint" }, "no runs yet"));
  } catch (e) {
    list.replaceChildren(el("li", { class: "error" }, String(e.message || e)));
  }
}
$("#runs-refresh").addEventListener("click", loadRuns);

// ---- jobs: one refrag.py run at a time, its log followed live ----
let jobFlags = {}, logOffset = 0, polling = null;
function showJobFlags() {
  const cmd = $("#job-command").value;
  $("#job-flags").replaceChildren(...(jobFlags[cmd] || []).map((f) =>
    el("label", {}, "--" + f, el("input", { name: f, placeholder: f === "resume" ? "true to resume"
      : f === "out" || f === "out_dir" ? "under the runs directory (default jobs/<id>)" : "" }))));
}
$("#job-command").addEventListener("change", showJobFlags);
async function pollJob() {
  try {
    const st = await apiJson("/api/jobs?offset=" + logOffset);
    if (!st.job) return;
    $("#job-status").textContent = `${st.job.command} — ${st.job.running ? "running" : "exit " + st.job.returncode}`;
    if (st.log) { $("#job-log").textContent += st.log; $("#job-log").scrollTop = 1e9; }
    logOffset = st.offset;
    if (st.job.running && !polling) polling = setInterval(pollJob, 1000);
    if (!st.job.running && polling) { clearInterval(polling); polling = null; loadRuns(); }
  } catch (e) { $("#job-status").textContent = String(e.message || e); }
}
$("#job-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const flags = {};
  for (const input of $("#job-flags").querySelectorAll("input")) {
    if (!input.value) continue;
    flags[input.name] = input.name === "resume" ? input.value === "true" : input.value;
  }
  try {
    await apiJson("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ command: $("#job-command").value, flags }) });
    $("#job-log").textContent = ""; logOffset = 0;
    pollJob();
  } catch (e) { $("#job-status").textContent = String(e.message || e); }
});

async function init() {
  try {
    const cfg = await apiJson("/api/config");
    $("#key-box").hidden = true;
    $("#server-info").textContent = (cfg.refrag ? `REFRAG reader ${cfg.decoder}` : "REFRAG mode not loaded (no --load_dir)") +
      ` · full-context reader ${cfg.full_reader} · index ${cfg.index || "none"}` +
      (cfg.load_dir ? ` · checkpoint ${cfg.load_dir}` : "") + (cfg.policy ? ` · policy ${cfg.policy}` : "");
    const d = cfg.defaults;
    $("#topk").value = d.topk; $("#k").value = d.k; $("#p").value = d.p; $("#max_new").value = Math.min(d.max_new, 64);
    $("#heuristic").options[0].textContent = cfg.policy ? "policy" : "default (random)";
    jobFlags = cfg.jobs || {};
    $("#jobs").hidden = !cfg.jobs;
    $("#job-command").replaceChildren(...Object.keys(jobFlags).map((c) => el("option", {}, c)));
    showJobFlags();
    pollJob();
  } catch (e) {
    $("#server-info").textContent = String(e.message || e);
  }
}
init();
