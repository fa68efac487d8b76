/* tinyfed dashboard: builds its state from the server-sent event stream at "events" and draws
 * it with uPlot (vendored). Records are keyed by (run, seq), so a replay never duplicates a
 * point; the numbers drawn and listed are the records' own numbers.
 * window.tinyfedData exposes the current state (for tests and the curious). */
(function () {
  "use strict";

  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#7f7f7f", "#bcbd22"];
  const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3]];
  const TABLE_KEYS = ["round", "test_accuracy", "test_loss", "train_loss", "clients_selected",
    "clients_succeeded", "clients_failed", "bytes_down", "bytes_up", "cum_bytes_down",
    "cum_bytes_up", "wall_seconds", "epsilon", "sim_hours", "cum_energy_j"];

  const state = { boot: null, runs: [] };
  window.tinyfedData = { boot: null, runs: [] };
  const charts = {};
  window.tinyfedCharts = charts;  // id -> {plot: uPlot}; tests move the cursor through it

  // ---------- formatting ----------
  function humanBytes(n, digits) {
    if (n == null) return "—";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0, v = Math.abs(n);
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    const s = i === 0 ? String(Math.round(v)) : String(+v.toPrecision(digits || 3));
    return (n < 0 ? "-" : "") + s + " " + units[i];
  }
  const exact = (v) => (v == null ? "—" : String(v));
  const pct = (v) => (v == null ? "—" : String(v) + " (" + (100 * v).toFixed(2) + " %)");
  const bytesExact = (v) => (v == null ? "—" : v.toLocaleString("en-US") + " B (" + humanBytes(v) + ")");
  const secs = (v) => (v == null ? "—" : String(v) + " s");

  // ---------- state from events ----------
  function run(i) {
    if (!state.runs[i]) state.runs[i] = { name: "run " + i, meta: {}, records: new Map(), problems: [] };
    return state.runs[i];
  }
  function handle(type, ev) {
    if (type === "meta") {
      const r = run(ev.run);
      r.name = ev.name;
      r.meta = ev;
    } else if (type === "record") {
      run(ev.run).records.set(ev.seq, ev.record);
    } else if (type === "problem") {
      const r = run(ev.run);
      if (!r.problems.includes(ev.message)) r.problems.push(ev.message);
    } else if (type === "reset") {
      run(ev.run).records.clear();
    } else if (type === "progress") {  // frequent: redraw the line alone, not the charts
      run(ev.run).progress = ev;
      drawProgress();
      return;
    }
    schedule();
  }

  function setStatus(kind, text) {
    const el = document.getElementById("status");
    el.dataset.state = kind;
    el.textContent = text;
  }

  let source = null;
  function connect() {
    source = new EventSource("events");
    source.addEventListener("hello", (e) => {
      const msg = JSON.parse(e.data);
      if (!msg.resumed) { state.runs = []; }  // a full replay follows: rebuild, never duplicate
      state.boot = msg.boot;
      setStatus("live", "live");
      schedule();
    });
    for (const type of ["meta", "record", "problem", "reset", "progress"]) {
      source.addEventListener(type, (e) => handle(type, JSON.parse(e.data)));
    }
    source.onopen = () => setStatus("live", "live");
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        setStatus("reconnecting", "disconnected — retrying");
        setTimeout(connect, 2000);
      } else {
        setStatus("reconnecting", "server unreachable — reconnecting…");
      }
    };
  }

  // ---------- derived series ----------
  function rounds(r) {
    return [...r.records.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1])
      .filter((rec) => (rec.kind || "round") === "round" && typeof rec.round === "number");
  }
  function updates(r) {
    return [...r.records.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1])
      .filter((rec) => rec.kind === "update");
  }
  function estimate(r, rec) {
    const w = r.meta.payload_bytes, c = r.meta.clients_per_round;
    return w == null || c == null ? null : w * c * rec.round;
  }

  // Chart specs: each line is (label, value of a record, formatter, dash index).
  const SPECS = {
    accuracy: { y: "test accuracy (%)", axis: (v, d) => +(100 * v).toPrecision(d || 3) + "%",
      lines: [["test accuracy", (r, x) => x.test_accuracy, pct, 0]] },
    loss: { y: "cross-entropy (nats)", axis: (v, d) => +v.toPrecision(d || 3),
      lines: [["test loss", (r, x) => x.test_loss, exact, 0], ["train loss", (r, x) => x.train_loss, exact, 1]] },
    bytes: { y: "bytes per round", axis: humanBytes,
      lines: [["down", (r, x) => x.bytes_down, bytesExact, 0], ["up", (r, x) => x.bytes_up, bytesExact, 1]] },
    cumbytes: { y: "cumulative bytes", axis: humanBytes,
      lines: [["down", (r, x) => x.cum_bytes_down, bytesExact, 0], ["up", (r, x) => x.cum_bytes_up, bytesExact, 1],
        ["estimate W·C·R", estimate, bytesExact, 2]] },
    clients: { y: "clients", axis: (v) => v,
      lines: [["selected", (r, x) => x.clients_selected, exact, 1], ["succeeded", (r, x) => x.clients_succeeded, exact, 0],
        ["failed", (r, x) => x.clients_failed, exact, 2]] },
    seconds: { y: "seconds per round (s)", axis: (v, d) => +v.toPrecision(d || 3) + " s",
      lines: [["wall time", (r, x) => x.wall_seconds, secs, 0]] },
    privacy: { y: "privacy spent ε (at the run's δ)", axis: (v, d) => +v.toPrecision(d || 3),
      lines: [["ε", (r, x) => x.epsilon, exact, 0]] },
  };

  function roundChartData(id) {
    const spec = SPECS[id];
    const xs = new Set();
    const runs = state.runs.filter((r) => r && rounds(r).length > 0);
    runs.forEach((r) => rounds(r).forEach((x) => xs.add(x.round)));
    const xArr = [...xs].sort((a, b) => a - b);
    const series = [], data = [xArr];
    let points = 0;
    runs.forEach((r, ri) => {
      const byRound = new Map(rounds(r).map((x) => [x.round, x]));
      spec.lines.forEach(([label, get, fmt, dash], li) => {
        const ys = xArr.map((x) => (byRound.has(x) ? get(r, byRound.get(x)) ?? null : null));
        if (li === 0) points = Math.max(points, ys.filter((v) => v != null).length);
        const color = runs.length > 1 ? PALETTE[ri % PALETTE.length] : PALETTE[li % PALETTE.length];
        series.push({ label: runs.length > 1 ? r.name + " · " + label : label, stroke: color,
          dash: DASHES[dash], width: 2, spanGaps: true, points: { show: true, size: 5 },
          value: (u, v) => fmt(v) });
        data.push(ys);
      });
    });
    return { series, data, points, xLabel: "round", yLabel: spec.y, axis: spec.axis };
  }

  // Accuracy against a cumulative quantity of a simulated fleet (hours, energy): x is that
  // quantity, one line per run; runs' x values are merged and each run spans its own gaps.
  function againstChartData(key, scale, xLabel) {
    const runs = state.runs.filter((r) => r && rounds(r).some((x) => x[key] != null));
    const perRun = runs.map((r) => rounds(r).filter((x) => x[key] != null && x.test_accuracy != null)
      .map((x) => [x[key] * scale, x.test_accuracy]));
    const xArr = [...new Set(perRun.flat().map((p) => p[0]))].sort((a, b) => a - b);
    const data = [xArr], series = [];
    perRun.forEach((pts, ri) => {
      const at = new Map(pts);
      data.push(xArr.map((v) => (at.has(v) ? at.get(v) : null)));
      series.push({ label: runs.length > 1 ? runs[ri].name : "test accuracy",
        stroke: PALETTE[ri % PALETTE.length], width: 2, spanGaps: true,
        points: { show: true, size: 5 }, value: (u, v) => pct(v) });
    });
    return { series, data, points: Math.max(0, ...perRun.map((p) => p.length)), xLabel,
      yLabel: "test accuracy (%)", axis: SPECS.accuracy.axis, fractional: true };
  }

  function rateChartData() {
    // Merged updates per second of the run's wall clock, bucketed by whole seconds.
    const runs = state.runs.filter((r) => r && updates(r).length > 0);
    const perRun = runs.map((r) => {
      const ups = updates(r).filter((u) => u.merged !== false);
      const t = ups.map((u) => u.elapsed_seconds ?? u.time).filter((v) => typeof v === "number");
      const t0 = t.length && ups[0].elapsed_seconds == null ? Math.min(...t) : 0;
      const counts = new Map();
      t.forEach((v) => { const b = Math.floor(v - t0); counts.set(b, (counts.get(b) || 0) + 1); });
      return counts;
    });
    const xs = new Set();
    perRun.forEach((c) => c.forEach((_, k) => xs.add(k)));
    const max = xs.size ? Math.max(...xs) : -1;
    const xArr = [];
    for (let s = 0; s <= max; s++) xArr.push(s);
    const data = [xArr], series = [];
    perRun.forEach((c, ri) => {
      data.push(xArr.map((s) => c.get(s) || 0));
      series.push({ label: runs.length > 1 ? runs[ri].name : "merged updates/s",
        stroke: PALETTE[ri % PALETTE.length], width: 2, value: (u, v) => exact(v) + " /s" });
    });
    return { series, data, points: xArr.length, xLabel: "time since start (s)",
      yLabel: "merged updates (1/s)", axis: (v) => v };
  }

  function stalenessChartData() {
    const runs = state.runs.filter((r) => r && updates(r).length > 0);
    const perRun = runs.map((r) => {
      const counts = new Map();
      updates(r).forEach((u) => { if (typeof u.staleness === "number") counts.set(u.staleness, (counts.get(u.staleness) || 0) + 1); });
      return counts;
    });
    const xs = new Set();
    perRun.forEach((c) => c.forEach((_, k) => xs.add(k)));
    const xArr = [...xs].sort((a, b) => a - b);
    const data = [xArr], series = [];
    perRun.forEach((c, ri) => {
      data.push(xArr.map((s) => c.get(s) || 0));
      const color = PALETTE[ri % PALETTE.length];
      series.push({ label: runs.length > 1 ? runs[ri].name : "updates", stroke: color,
        fill: color + "99", width: 1, value: (u, v) => exact(v) + " updates",
        paths: uPlot.paths.bars({ size: [0.8 / Math.max(1, runs.length), 60] }), points: { show: false } });
    });
    return { series, data, points: xArr.length, xLabel: "staleness (model versions behind)",
      yLabel: "updates (count)", axis: (v) => v, xRange: (u, lo, hi) => [lo - 0.6, hi + 0.6] };
  }

  // ---------- drawing ----------
  // Tick labels with just enough digits to tell neighbouring ticks apart.
  function distinct(vals, fmt) {
    for (let digits = 3; digits <= 9; digits++) {
      const out = vals.map((v) => (v == null ? "" : fmt(v, digits)));
      if (new Set(out).size === out.length) return out;
    }
    return vals.map((v) => String(v));
  }
  function chartSize(el) {
    const w = Math.max(260, el.clientWidth || 400);
    return { width: w, height: w < 500 ? 200 : 240 };
  }

  function draw(id, built) {
    const el = document.getElementById("chart-" + id);
    const key = built.series.map((s) => s.label).join("|");
    let c = charts[id];
    if (c && c.key !== key) { c.plot.destroy(); c = null; }
    if (!c) {
      const opts = Object.assign(chartSize(el), {
        scales: { x: built.xRange ? { time: false, range: built.xRange } : { time: false } },
        axes: [
          { label: built.xLabel, incrs: built.fractional ? null
            : [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] },
          { label: built.yLabel, values: (u, vals) => distinct(vals, built.axis),
            size: (u, vals) => 34 + 7 * Math.max(2, ...(vals || []).map((v) => String(v).length)) },
        ],
        series: [{ label: built.xLabel }].concat(built.series),
        cursor: { points: { size: 7 } },
        legend: { live: true },
      });
      c = charts[id] = { key, plot: new uPlot(opts, built.data, el) };
    } else {
      c.plot.setData(built.data);
    }
    el.dataset.points = String(built.points);
    el.dataset.series = String(built.series.length);
  }

  function drawCharts() {
    for (const id of Object.keys(SPECS)) draw(id, roundChartData(id));
    // the privacy card only for runs that spend a privacy budget (dp-fedavg)
    document.getElementById("card-privacy").hidden =
      !state.runs.some((r) => r && rounds(r).some((x) => x.epsilon != null));
    // the fleet cards only for runs on a simulated clock (records with sim_hours)
    const anyFleet = state.runs.some((r) => r && rounds(r).some((x) => x.sim_hours != null));
    for (const [id, key, scale, label] of [["simtime", "sim_hours", 1, "simulated hours"],
      ["energy", "cum_energy_j", 1e-3, "energy, all devices (kJ)"]]) {
      document.getElementById("card-" + id).hidden = !anyFleet;
      if (anyFleet) draw(id, againstChartData(key, scale, label));
    }
    const anyAsync = state.runs.some((r) => r && updates(r).length > 0);
    for (const id of ["rate", "staleness"]) {
      document.getElementById("card-" + id).hidden = !anyAsync;
      if (anyAsync) draw(id, id === "rate" ? rateChartData() : stalenessChartData());
    }
  }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);
  }

  // The round in progress (the server words it, with the console's ETA rule); hidden once
  // that round's record is in.
  function drawProgress() {
    const lines = [];
    state.runs.forEach((r) => {
      if (!r || !r.progress) return;
      const done = rounds(r).map((x) => x.round);
      if (done.length && Math.max(...done) >= r.progress.round) return;
      lines.push('<div class="progress-line">' + (state.runs.length > 1 ? esc(r.name) + ": " : "") +
        esc(r.progress.text) + "</div>");
    });
    document.getElementById("progress").innerHTML = lines.join("");
    window.tinyfedProgress = lines.length ? document.getElementById("progress").textContent : "";
  }

  function drawNotices() {
    const parts = [];
    state.runs.forEach((r) => {
      if (!r) return;
      if (r.meta.notice) parts.push(`<div class="notice" data-run="${esc(r.name)}"><b>${esc(r.name)}</b>: ${esc(r.meta.notice)}</div>`);
      if (r.problems.length) {
        const shown = r.problems.slice(0, 20).map((p) => `<li>${esc(p)}</li>`).join("");
        const more = r.problems.length > 20 ? `<li>… and ${r.problems.length - 20} more</li>` : "";
        parts.push(`<div class="notice error problems" data-run="${esc(r.name)}"><b>${esc(r.name)}</b>: ` +
          `${r.problems.length} malformed line(s) in metrics.jsonl were skipped; the other records are shown.<ul>${shown}${more}</ul></div>`);
      }
      const unknown = new Map();
      r.records.forEach((rec) => { const k = rec.kind || "round"; if (k !== "round" && k !== "update") unknown.set(k, (unknown.get(k) || 0) + 1); });
      unknown.forEach((n, k) => parts.push(`<div class="notice" data-run="${esc(r.name)}"><b>${esc(r.name)}</b>: ${n} record(s) of kind "${esc(k)}" are not plotted (this page does not know that kind).</div>`));
    });
    const el = document.getElementById("notices");
    const html = parts.join("");
    if (el.innerHTML !== html) el.innerHTML = html;
  }

  function drawTables() {
    const html = state.runs.filter(Boolean).map((r) => {
      const head = TABLE_KEYS.map((k) => `<th>${k}</th>`).join("");
      const body = rounds(r).map((x) => `<tr data-run="${esc(r.name)}" data-round="${x.round}">` +
        TABLE_KEYS.map((k) => `<td data-key="${k}">${x[k] == null ? "" : esc(x[k])}</td>`).join("") + "</tr>").join("");
      return `<h3>${esc(r.name)}</h3><table class="records" data-run="${esc(r.name)}"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
    }).join("");
    document.getElementById("tables").innerHTML = html;
  }

  function drawConfigs() {
    const runs = state.runs.filter((r) => r && r.meta.config);
    if (!runs.length) { document.getElementById("configs").textContent = "no config.toml yet"; return; }
    const keys = [...new Set(runs.flatMap((r) => Object.keys(r.meta.config)))].sort();
    const fmt = (v) => (v == null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v));
    const rows = keys.map((k) => {
      const vals = runs.map((r) => fmt(r.meta.config[k]));
      const differs = new Set(vals).size > 1 ? " class=\"differs\"" : "";
      return `<tr${differs}><td>${esc(k)}</td>${vals.map((v) => `<td>${esc(v)}</td>`).join("")}</tr>`;
    });
    const extra = `<tr><td>W (model payload)</td>${runs.map((r) => `<td>${bytesExact(r.meta.payload_bytes)}</td>`).join("")}</tr>`;
    const head = `<tr><th>key</th>${runs.map((r) => `<th>${esc(r.name)}</th>`).join("")}</tr>`;
    const html = `<table class="config"><thead>${head}</thead><tbody>${rows.join("")}${extra}</tbody></table>`;
    const el = document.getElementById("configs");
    if (el.innerHTML !== html) el.innerHTML = html;
  }

  function drawHeatmap() {
    const select = document.getElementById("partition-run");
    const runs = state.runs.filter((r) => r && r.meta.partition);
    const names = runs.map((r) => r.name);
    if ([...select.options].map((o) => o.value).join("|") !== names.join("|")) {
      const keep = select.value;
      select.innerHTML = names.map((n) => `<option>${esc(n)}</option>`).join("");
      if (names.includes(keep)) select.value = keep;
    }
    select.hidden = names.length < 2;
    const canvas = document.getElementById("heatmap-canvas");
    const r = runs.find((x) => x.name === select.value) || runs[0];
    if (!r) { canvas.width = 0; canvas.height = 0; document.getElementById("heatmap-hover").textContent = "no partition.json yet"; return; }
    const p = r.meta.partition, classes = p.classes || [], clients = p.clients || [];
    const width = Math.max(260, document.getElementById("heatmap").clientWidth);
    const left = 70, top = 18;
    const cw = Math.max(8, Math.floor((width - left - 4) / Math.max(1, classes.length)));
    const ch = Math.max(3, Math.min(18, Math.floor(420 / Math.max(1, clients.length))));
    canvas.width = left + cw * classes.length + 4;
    canvas.height = top + ch * clients.length + 4;
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, canvas.width, canvas.height);
    const max = Math.max(1, ...clients.flatMap((c) => c.labels || []));
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#5f6b77";
    g.fillText("client \\ label", 2, 12);
    classes.forEach((name, j) => { g.save(); g.beginPath(); g.rect(left + j * cw, 0, cw - 2, top); g.clip(); g.fillText(String(j), left + j * cw + 2, 12); g.restore(); });
    const every = Math.ceil(12 / ch);
    clients.forEach((c, i) => {
      if (i % every === 0) { g.fillStyle = "#5f6b77"; g.fillText("client " + c.client_id, 2, top + i * ch + Math.min(ch, 12) - 1); }
      (c.labels || []).forEach((n, j) => {
        const a = n / max;
        g.fillStyle = n === 0 ? "#f1f3f5" : `rgba(23, 50, 77, ${0.12 + 0.88 * a})`;
        g.fillRect(left + j * cw, top + i * ch, cw - 1, Math.max(1, ch - 1));
      });
    });
    canvas.onmousemove = (e) => {
      const rect = canvas.getBoundingClientRect();
      const j = Math.floor((e.clientX - rect.left - left) / cw), i = Math.floor((e.clientY - rect.top - top) / ch);
      const c = clients[i];
      document.getElementById("heatmap-hover").textContent = c && j >= 0 && j < classes.length
        ? `client ${c.client_id} (${c.size} examples): label ${j} "${classes[j]}" × ${c.labels[j]} examples`
        : `${clients.length} clients × ${classes.length} labels; darkest = ${max} examples`;
    };
  }

  function publish() {
    const runs = state.runs.filter(Boolean).map((r) => ({
      name: r.name, path: r.meta.path, config: r.meta.config, partition: r.meta.partition,
      payload_bytes: r.meta.payload_bytes, clients_per_round: r.meta.clients_per_round,
      notice: r.meta.notice, problems: r.problems.slice(), progress: r.progress || null,
      records: [...r.records.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1]),
    }));
    window.tinyfedData = { boot: state.boot, runs };
    document.getElementById("runs-title").textContent = runs.map((r) => r.name).join(" · ");
  }

  function render() {
    publish();
    drawProgress();
    drawNotices();
    drawCharts();
    drawConfigs();
    drawHeatmap();
    drawTables();
  }

  let pending = null;
  function schedule() {
    if (pending == null) pending = setTimeout(() => { pending = null; render(); }, 80);
  }

  window.addEventListener("resize", () => {
    for (const id of Object.keys(charts)) {
      const el = document.getElementById("chart-" + id);
      charts[id].plot.setSize(chartSize(el));
    }
    drawHeatmap();
  });
  document.getElementById("partition-run").addEventListener("change", drawHeatmap);

  connect();
})();
