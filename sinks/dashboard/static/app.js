// boldstream live dashboard. Receives a snapshot then deltas over server-sent
// events (/events) and renders the most recently active series. The model and
// the delta rules mirror sinks/dashboard/state.py. No network access other
// than this page's own origin (the server's Content-Security-Policy enforces it).
"use strict";

(function () {
  const C = {
    sky: "#56b4e9", orange: "#e69f00", green: "#009e73", yellow: "#f0e442",
    blue: "#0072b2", vermillion: "#d55e00", purple: "#cc79a7",
    fg: "#eef1f4", muted: "#9aa4ae", grid: "#2c333b",
  };
  const FD_THRESHOLDS = [
    { mm: 0.2, color: C.yellow, dash: [2, 4] },
    { mm: 0.3, color: C.orange, dash: [8, 4] },
    { mm: 0.5, color: C.vermillion, dash: [14, 4] },
  ];
  const STD_DVARS_LIMIT = 1.5;
  const RAD2DEG = 180 / Math.PI;

  const model = {
    series: new Map(),
    warnings: [],
    subscriber: null,
    maxPoints: 4096,
    maxSeries: 4,
    heartbeatS: 10,
  };
  let pinned = null; // series id chosen by a click, else the most recent one

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ model

  function emptyColumns(names) {
    const out = {};
    for (const n of names) out[n] = [];
    return out;
  }

  function newSeries(header) {
    return Object.assign(
      {
        qc: emptyColumns(["index", "fd_mm", "dvars", "std_dvars", "tsnr_median", "outlier", "latency_ms"]),
        motion: emptyColumns(["index", "trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "flagged"]),
        usable: null, receiver: null, target: null, guidance: null, warnings: [],
      },
      header,
    );
  }

  // Same rule as state.Trace.add: keep rows sorted by index, replace repeats, cap length.
  function insertRow(cols, row) {
    const idx = cols.index;
    const names = Object.keys(cols);
    const i = row.index;
    if (idx.length === 0 || i > idx[idx.length - 1]) {
      for (const n of names) cols[n].push(row[n] === undefined ? null : row[n]);
    } else {
      let lo = 0, hi = idx.length;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (idx[mid] < i) lo = mid + 1; else hi = mid; }
      const same = idx[lo] === i;
      for (const n of names) cols[n].splice(lo, same ? 1 : 0, row[n] === undefined ? null : row[n]);
    }
    const excess = idx.length - model.maxPoints;
    if (excess > 0) for (const n of names) cols[n].splice(0, excess);
  }

  function ensure(id) {
    let s = model.series.get(id);
    if (!s) { s = newSeries({ id: id }); model.series.set(id, s); }
    return s;
  }

  function applySnapshot(snap) {
    model.series = new Map();
    for (const s of snap.series) model.series.set(s.id, s);
    model.warnings = snap.warnings || [];
    model.subscriber = snap.subscriber;
    model.maxPoints = snap.max_points || model.maxPoints;
    model.maxSeries = snap.max_series || model.maxSeries;
    model.heartbeatS = snap.heartbeat_s || model.heartbeatS;
  }

  function pushCapped(list, item) { list.push(item); if (list.length > 20) list.shift(); }

  function applyDelta(d) {
    switch (d.type) {
      case "series": { Object.assign(ensure(d.series.id), d.series); break; }
      case "drop": { model.series.delete(d.id); if (pinned === d.id) pinned = null; break; }
      case "qc": {
        const s = ensure(d.id);
        insertRow(s.qc, d.row);
        s.usable = d.usable; s.receiver = d.receiver; s.updated = Date.now() / 1000;
        break;
      }
      case "motion": { insertRow(ensure(d.id).motion, d.row); break; }
      case "receiver": { const s = ensure(d.id); s.receiver = d.receiver; s.updated = Date.now() / 1000; break; }
      case "target": { ensure(d.id).target = d.target; break; }
      case "guidance": { ensure(d.id).guidance = d.guidance; break; }
      case "warning": {
        if (d.id === null) pushCapped(model.warnings, d.warning);
        else pushCapped(ensure(d.id).warnings, d.warning);
        break;
      }
      case "status": { model.subscriber = d.subscriber; break; }
      default: break;
    }
  }

  function currentSeries() {
    if (pinned && model.series.has(pinned)) return model.series.get(pinned);
    let best = null;
    for (const s of model.series.values()) if (!best || (s.updated || 0) >= (best.updated || 0)) best = s;
    return best;
  }

  // ------------------------------------------------------------------ charts

  function axis(label, extra) {
    return Object.assign({
      stroke: C.fg, label: label, font: "15px system-ui, sans-serif", labelFont: "15px system-ui, sans-serif",
      grid: { stroke: C.grid, width: 1 }, ticks: { stroke: C.grid, width: 1 }, size: 60,
    }, extra || {});
  }

  function line(label, color, extra) {
    return Object.assign({ label: label, stroke: color, width: 2, spanGaps: false, points: { show: false } }, extra || {});
  }

  const charts = {};

  function makeChart(id, series, axes, scales) {
    const el = $(id);
    const opts = {
      width: Math.max(300, el.clientWidth), height: 220,
      scales: Object.assign({ x: { time: false } }, scales || {}),
      axes: [axis("volume")].concat(axes),
      series: [{ label: "volume" }].concat(series),
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
    };
    const data = [[]].concat(series.map(() => []));
    const chart = new uPlot(opts, data, el);
    charts[id] = chart;
    return chart;
  }

  function buildCharts() {
    makeChart("chart-fd",
      [line("FD (mm)", C.sky)].concat(FD_THRESHOLDS.map((t) =>
        line(t.mm + " mm", t.color, { width: 1.5, dash: t.dash }))),
      [axis("mm")], { y: { range: (u, min, max) => [0, Math.max(0.6, max || 0)] } });
    makeChart("chart-dvars",
      [line("std DVARS", C.sky), line(STD_DVARS_LIMIT + " limit", C.vermillion, { width: 1.5, dash: [10, 4] }),
       line("DVARS", C.orange, { scale: "dvars", width: 1.5 })],
      [axis("std DVARS"), axis("DVARS", { side: 1, scale: "dvars", grid: { show: false } })],
      { y: { range: (u, min, max) => [0, Math.max(2, max || 0)] }, dvars: { range: (u, min, max) => [0, (max || 1) * 1.05] } });
    makeChart("chart-trans",
      [line("x", C.sky), line("y", C.orange), line("z", C.purple)], [axis("mm")]);
    makeChart("chart-rot",
      [line("x", C.sky), line("y", C.orange), line("z", C.purple)],
      [axis("degrees")]);
    makeChart("chart-latency",
      [line("latency", C.green), line("TR", C.vermillion, { width: 1.5, dash: [10, 4] })],
      [axis("ms")], { y: { range: (u, min, max) => [0, Math.max(max || 0, 100) * 1.05] } });
    makeChart("chart-tsnr", [line("tSNR median", C.green)], [axis("")]);

    const ro = new ResizeObserver(() => {
      for (const id of Object.keys(charts)) {
        const el = $(id);
        charts[id].setSize({ width: Math.max(300, el.clientWidth), height: 220 });
      }
    });
    for (const id of Object.keys(charts)) ro.observe($(id));
  }

  function countFinite(arr) { let n = 0; for (const v of arr) if (v !== null && v !== undefined) n++; return n; }

  function setChart(id, data, counted) {
    charts[id].setData(data);
    $(id).dataset.points = String(countFinite(counted));
  }

  function constant(xs, v) { return xs.map(() => v); }

  function renderCharts(s) {
    const q = s ? s.qc : emptyColumns(["index", "fd_mm", "dvars", "std_dvars", "tsnr_median", "latency_ms"]);
    const m = s ? s.motion : emptyColumns(["index", "trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]);
    const x = q.index;
    setChart("chart-fd", [x, q.fd_mm].concat(FD_THRESHOLDS.map((t) => constant(x, t.mm))), q.fd_mm);
    setChart("chart-dvars", [x, q.std_dvars, constant(x, STD_DVARS_LIMIT), q.dvars], q.dvars);
    const deg = (a) => a.map((v) => (v === null ? null : v * RAD2DEG));
    setChart("chart-trans", [m.index, m.trans_x, m.trans_y, m.trans_z], m.trans_x);
    setChart("chart-rot", [m.index, deg(m.rot_x), deg(m.rot_y), deg(m.rot_z)], m.rot_x);
    const trMs = s && s.tr_s ? s.tr_s * 1000 : null;
    setChart("chart-latency", [x, q.latency_ms, constant(x, trMs)], q.latency_ms);
    setChart("chart-tsnr", [x, q.tsnr_median], q.tsnr_median);
  }

  // ------------------------------------------------------------------ panels

  function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
  function lastFinite(arr) { for (let i = arr.length - 1; i >= 0; i--) if (arr[i] !== null) return arr[i]; return null; }
  function setTile(id, level) { const el = $(id); el.classList.remove("ok", "caution", "bad"); if (level) el.classList.add(level); }

  function renderTitle(s) {
    const title = $("series-title");
    if (!s) { title.textContent = "waiting for a series…"; return; }
    const parts = [s.session_key || "session ?"];
    if (s.series_number !== null && s.series_number !== undefined) parts.push("series " + s.series_number);
    if (s.description) parts.push(s.description);
    if (s.tr_s) parts.push("TR " + s.tr_s.toFixed(2) + " s");
    if (s.ended) parts.push("ended" + (s.ended.reason ? " (" + s.ended.reason + ")" : ""));
    title.textContent = parts.join(" · ");

    const tabs = $("series-tabs");
    tabs.replaceChildren();
    if (model.series.size > 1) {
      for (const other of model.series.values()) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = (other.session_key || "?") + " #" + (other.series_number ?? "?");
        b.setAttribute("aria-pressed", other.id === s.id ? "true" : "false");
        b.addEventListener("click", () => { pinned = other.id; scheduleRender(); });
        tabs.appendChild(b);
      }
    }
  }

  function renderTiles(s) {
    const q = s ? s.qc : null;
    const r = s ? s.receiver : null;
    const fd = q ? lastFinite(q.fd_mm) : null;
    $("fd-now").textContent = fmt(fd, 2);
    setTile("tile-fd", fd === null ? null : fd >= 0.5 ? "bad" : fd >= 0.2 ? "caution" : "ok");

    $("received").textContent = r ? String(r.received) : "0";
    $("received-sub").textContent = r && r.shape ? "received · " + r.shape.join("×") : "received";
    const missing = r ? r.n_missing : 0;
    $("missing").textContent = String(missing);
    const late = r && r.n_late ? r.n_late + " late · " : "";
    $("missing-sub").textContent = r && r.missing.length
      ? late + "#" + r.missing.slice(-3).map((mv) => mv.index).join(", #") : "none missing";
    setTile("tile-missing", missing > 0 ? "caution" : r ? "ok" : null);

    const lat = q ? lastFinite(q.latency_ms) : null;
    const trMs = s && s.tr_s ? s.tr_s * 1000 : null;
    $("latency").textContent = fmt(lat, 0);
    $("latency-sub").textContent = "ms" + (trMs ? " (TR " + trMs.toFixed(0) + ")" : "") +
      (r && r.n_slow ? " · " + r.n_slow + " over TR" : "");
    setTile("tile-latency", lat === null ? null : trMs && lat > trMs ? "bad" : trMs && lat > 0.5 * trMs ? "caution" : "ok");

    $("tsnr").textContent = fmt(q ? lastFinite(q.tsnr_median) : null, 1);

    let outliers = 0, n = 0;
    if (q) for (const o of q.outlier) { if (o !== null) n++; if (o) outliers++; }
    $("outliers").textContent = String(outliers);
    $("outliers-sub").textContent = n ? (100 * outliers / n).toFixed(0) + "% of " + n : " ";
    setTile("tile-outliers", n ? (outliers / n > 0.2 ? "bad" : outliers ? "caution" : "ok") : null);
  }

  function renderUsable(s) {
    const u = s ? s.usable : null;
    const rows = $("usable-rows");
    if (!u || !u.thresholds.length) {
      $("goal").textContent = "";
      rows.replaceChildren(Object.assign(document.createElement("div"), { className: "muted", textContent: "no QC yet" }));
      return;
    }
    $("goal").textContent = "(goal " + fmt(u.goal_minutes, 1) + " min · " + fmt(u.minutes_total, 1) + " min scanned)";
    const keep = new Set();
    for (const t of u.thresholds) {
      const key = "good-" + t.fd_threshold_mm;
      keep.add(key);
      let row = document.getElementById(key);
      if (!row) {
        row = document.createElement("div");
        row.className = "urow"; row.id = key;
        row.innerHTML = '<div class="head"></div><div class="big"></div><div class="bar"><div></div></div><div class="eta"></div>';
        rows.appendChild(row);
      }
      row.querySelector(".head").textContent = "FD < " + t.fd_threshold_mm + " mm";
      const big = row.querySelector(".big");
      big.replaceChildren(document.createTextNode(fmt(t.minutes, 1) + " "),
        Object.assign(document.createElement("small"), { textContent: "min good · " + fmt(100 * t.fraction, 0) + "%" }));
      big.dataset.minutes = String(t.minutes);
      const done = t.minutes_to_goal === 0;
      const bar = row.querySelector(".bar");
      bar.classList.toggle("done", done);
      bar.firstElementChild.style.width = Math.min(100, 100 * t.minutes / u.goal_minutes) + "%";
      row.querySelector(".eta").textContent = done ? "goal reached"
        : t.minutes_to_goal === null ? "no good volumes yet"
        : "goal in ~" + fmt(t.minutes_to_goal, 1) + " min more scanning";
    }
    for (const child of Array.from(rows.children)) if (!keep.has(child.id)) child.remove();
  }

  // Diverging blue (anticorrelated) - dark - orange (correlated): colour-blind safe on dark.
  function colormap(v, vmax) {
    if (v === null) return [40, 40, 40];
    const t = Math.max(-1, Math.min(1, v / vmax));
    const neg = [86, 180, 233], pos = [230, 159, 0], mid = [20, 20, 24];
    const c = t < 0 ? neg : pos, a = Math.abs(t);
    return [0, 1, 2].map((k) => Math.round(mid[k] + (c[k] - mid[k]) * a));
  }

  function drawSlice(sl, vmax) {
    const wrap = document.createElement("div");
    wrap.className = "slice";
    const canvas = document.createElement("canvas");
    const scale = Math.max(2, Math.floor(300 / Math.max(sl.width, sl.height)));
    const sx = scale * (sl.voxel_mm ? sl.voxel_mm[0] / Math.min(sl.voxel_mm[0], sl.voxel_mm[1]) : 1);
    const sy = scale * (sl.voxel_mm ? sl.voxel_mm[1] / Math.min(sl.voxel_mm[0], sl.voxel_mm[1]) : 1);
    canvas.width = Math.round(sl.width * sx); canvas.height = Math.round(sl.height * sy);
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(sl.width, sl.height);
    for (let i = 0; i < sl.values.length; i++) {
      const rgb = colormap(sl.values[i], vmax);
      img.data[4 * i] = rgb[0]; img.data[4 * i + 1] = rgb[1]; img.data[4 * i + 2] = rgb[2]; img.data[4 * i + 3] = 255;
    }
    const tmp = document.createElement("canvas");
    tmp.width = sl.width; tmp.height = sl.height;
    tmp.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
    const cx = (sl.cross[0] + 0.5) * sx, cy = (sl.cross[1] + 0.5) * sy;
    ctx.strokeStyle = C.yellow; ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(cx, 0); ctx.lineTo(cx, cy - 8); ctx.moveTo(cx, cy + 8); ctx.lineTo(cx, canvas.height);
    ctx.moveTo(0, cy); ctx.lineTo(cx - 8, cy); ctx.moveTo(cx + 8, cy); ctx.lineTo(canvas.width, cy);
    ctx.stroke();
    ctx.beginPath(); ctx.arc(cx, cy, 6, 0, 2 * Math.PI); ctx.stroke();
    ctx.fillStyle = C.fg; ctx.font = "bold 16px system-ui, sans-serif";
    ctx.textBaseline = "middle"; ctx.textAlign = "left"; ctx.fillText(sl.labels.left, 4, canvas.height / 2);
    ctx.textAlign = "right"; ctx.fillText(sl.labels.right, canvas.width - 4, canvas.height / 2);
    ctx.textAlign = "center"; ctx.textBaseline = "top"; ctx.fillText(sl.labels.top, canvas.width / 2, 4);
    ctx.textBaseline = "bottom"; ctx.fillText(sl.labels.bottom, canvas.width / 2, canvas.height - 4);
    const cap = document.createElement("div");
    cap.className = "cap"; cap.textContent = sl.plane;
    wrap.append(canvas, cap);
    return wrap;
  }

  const GUIDANCE_LABEL = {
    "cannot-tell-yet": "cannot tell yet", "keep-scanning": "keep scanning",
    "enough-data": "enough data", "not-settling": "not settling",
  };

  function renderGuidance(s) {
    const panel = $("guidance-panel");
    const g = s ? s.guidance : null;
    const st = $("guidance-state");
    if (!g) {
      panel.dataset.state = "none";
      st.textContent = ""; st.className = "status";
      $("guidance-message").textContent = s && s.target ? "…" : "waiting for the first target…";
      $("guidance-range").textContent = "";
      $("guidance-reason").textContent = "";
      return;
    }
    panel.dataset.state = g.state;
    st.textContent = GUIDANCE_LABEL[g.state] || g.state;
    st.className = "status status-" + g.state;
    $("guidance-message").textContent = g.message;
    const parts = [];
    if (g.minutes_more_range) {
      const lo = fmt(g.minutes_more_range[0], 0), hi = fmt(g.minutes_more_range[1], 0);
      // a range that rounds to one number (only the minutes floor binds) says nothing more
      if (lo !== hi) parts.push("likely " + lo + "–" + hi + " more minutes");
    }
    if (g.split_half_mm !== null) parts.push("split-half " + fmt(g.split_half_mm, 1) + " mm");
    if (g.drift_mm !== null) parts.push("drift " + fmt(g.drift_mm, 1) + " mm/min");
    if (g.good_minutes !== null) parts.push(fmt(g.good_minutes, 1) + " good min" + (g.fd_threshold_mm !== null ? " (FD < " + g.fd_threshold_mm + " mm)" : ""));
    $("guidance-range").textContent = parts.join(" · ");
    $("guidance-reason").textContent = g.reason;
  }

  let drawnTarget = null;

  function renderTarget(s) {
    const panel = $("target-panel");
    const t = s ? s.target : null;
    if (!t) { panel.hidden = true; drawnTarget = null; return; }
    panel.hidden = false;
    if (drawnTarget === t) return;
    drawnTarget = t;
    const st = $("target-status");
    st.textContent = t.status || "unknown";
    st.className = "status status-" + (t.status || "provisional");
    $("target-note").textContent = t.status === "stable"
      ? "Settled: the anticorrelation is beyond chance, and the split-half distance and last-minute movement stayed within limits for the hold. Check on the neuronavigation image before use."
      : "Provisional: not settled yet, keep scanning. Do not use for treatment planning yet.";
    const reasons = t.status === "stable" ? [] : (t.reasons || []);
    $("target-reasons").replaceChildren(...reasons.map((text) => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }));
    $("target-p").textContent = t.p_value === null || t.p_value === undefined
      ? "not tested" : "p = " + fmt(t.p_value, 3);
    $("target-held").textContent = t.held_s === null || t.held_s === undefined
      ? "–" : fmt(t.held_s, 0) + " s";
    const xyz = (v) => (v ? v.map((c) => fmt(c, 1)).join(", ") : "–");
    $("target-ras").textContent = xyz(t.ras_mm);
    $("target-mni").textContent = xyz(t.mni_mm);
    $("target-split").textContent = t.split_half_mm === null ? "–" : fmt(t.split_half_mm, 1) + " mm";
    $("target-drift").textContent = t.drift_mm === null ? "–" : fmt(t.drift_mm, 1) + " mm";
    $("target-good").textContent = t.good_minutes === null ? "–" : fmt(t.good_minutes, 1) + " min";
    $("target-index").textContent = t.index === null ? "–" : "#" + t.index;
    const vmax = t.vmax || 1;
    $("target-slices").replaceChildren(...t.slices.map((sl) => drawSlice(sl, vmax)));
    $("cb-min").textContent = "−" + vmax.toFixed(2);
    $("cb-max").textContent = "+" + vmax.toFixed(2);
  }

  function drawColorbar() {
    const c = $("colorbar"), ctx = c.getContext("2d");
    for (let x = 0; x < c.width; x++) {
      const rgb = colormap((x / (c.width - 1)) * 2 - 1, 1);
      ctx.fillStyle = "rgb(" + rgb.join(",") + ")";
      ctx.fillRect(x, 0, 1, c.height);
    }
  }

  function renderWarnings(s) {
    const list = (s ? s.warnings : []).concat(model.warnings).sort((a, b) => b.time - a.time).slice(0, 8);
    const ul = $("warnings");
    if (!list.length) { ul.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: "none" })); return; }
    ul.replaceChildren(...list.map((w) => {
      const li = document.createElement("li");
      const when = new Date(w.time * 1000).toLocaleTimeString();
      li.append(when + " ", Object.assign(document.createElement("code"), { textContent: w.code }),
        " " + w.message + (w.index !== null && w.index !== undefined ? " (volume " + w.index + ")" : ""));
      return li;
    }));
  }

  // ------------------------------------------------------------------ connection

  const CONN = { connecting: ["pill-wait", "connecting…"], live: ["pill-live", "live"],
    lost: ["pill-lost", "connection lost — reconnecting"], nopub: ["pill-wait", "waiting for the pipeline"] };
  let connState = "connecting";

  function setConn(state) {
    connState = state;
    const pill = $("conn");
    let shown = state;
    if (state === "live" && model.subscriber && !model.subscriber.connected) shown = "nopub";
    pill.className = "pill " + CONN[shown][0];
    pill.textContent = CONN[shown][1];
    pill.dataset.state = shown;
    const banner = $("banner");
    if (state === "lost") {
      banner.hidden = false; banner.className = "banner"; banner.textContent = "connection lost — reconnecting";
    } else if (shown === "nopub") {
      banner.hidden = false; banner.className = "banner warn";
      banner.textContent = "dashboard up, but not connected to the pipeline";
    } else {
      banner.hidden = true; banner.textContent = "";
    }
    document.body.dataset.conn = shown;
  }

  let source = null, lastEvent = 0, retryMs = 1000, retryTimer = null;

  function connect() {
    if (retryTimer) { clearTimeout(retryTimer); retryTimer = null; }
    if (source) source.close();
    source = new EventSource("/events");
    source.addEventListener("snapshot", (e) => {
      applySnapshot(JSON.parse(e.data));
      lastEvent = Date.now(); retryMs = 1000;
      setConn("live"); scheduleRender();
    });
    source.addEventListener("delta", (e) => {
      applyDelta(JSON.parse(e.data));
      lastEvent = Date.now();
      if (connState !== "live") setConn("live"); else if (e.data.indexOf('"status"') >= 0) setConn("live");
      scheduleRender();
    });
    source.onerror = () => {
      setConn("lost");
      // EventSource retries by itself while CONNECTING; after an HTTP error it
      // gives up (CLOSED), so retry here with a growing delay.
      if (source.readyState === EventSource.CLOSED) reconnectLater();
    };
  }

  function reconnectLater() {
    if (retryTimer) return;
    retryTimer = setTimeout(() => { retryTimer = null; connect(); }, retryMs);
    retryMs = Math.min(10000, retryMs * 2);
  }

  // A stream that went silent (no heartbeat) is as good as lost: start again.
  setInterval(() => {
    if (connState === "live" && Date.now() - lastEvent > (3 * model.heartbeatS + 2) * 1000) {
      setConn("lost");
      if (source) source.close();
      reconnectLater();
    }
  }, 1000);

  // ------------------------------------------------------------------ render loop

  let pending = false;
  function scheduleRender() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; render(); });
  }

  function render() {
    const s = currentSeries();
    renderTitle(s);
    renderTiles(s);
    renderUsable(s);
    renderGuidance(s);
    renderCharts(s);
    renderTarget(s);
    renderWarnings(s);
    document.body.dataset.series = s ? s.id : "";
  }

  function start() {
    buildCharts();
    drawColorbar();
    setConn("connecting");
    render();
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
