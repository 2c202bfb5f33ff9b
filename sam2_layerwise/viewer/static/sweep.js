/* sam2-layerwise sweep page. Plain JavaScript, no build step, no other site.
 *
 * Its data is the JSON element #data: written inline by the sweep's aggregation (sweep/index.html, opened from
 * disk: the items of every head are in it), or null when `sam2-layerwise view OUT` serves the page: then the
 * data comes from /api/sweep and the items of a clicked head from /api/sweep/items, both computed by the server
 * from the sweep's tables. Text from files goes through textContent only.
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "text") e.textContent = v;
      else if (k === "cls") e.className = v;
      else if (k === "data") for (const [dk, dv] of Object.entries(v)) e.dataset[dk] = dv;
      else if (k === "style") Object.assign(e.style, v);
      else e.setAttribute(k, v);
    }
    for (const c of children || []) if (c !== null && c !== undefined) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return e;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a < 1e-3 || a >= 1e5) return v.toExponential(2);
    return v.toPrecision(4);
  }

  function signed(v) { return v === null || v === undefined ? "n/a" : (v > 0 ? "+" : "") + fmt(v); }

  function status(text, isError) {
    const s = $("status");
    s.textContent = text || "";
    s.className = isError ? "error" : "";
  }

  // viridis (sequential) and a blue-white-red diverging scale, a few stops each
  const SEQ = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const DIV = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
  function colour(stops, t) {
    t = Math.max(0, Math.min(1, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i;
    return "rgb(" + stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v))).join(",") + ")";
  }
  function gradient(stops) {
    return "linear-gradient(to right, " + stops.map((_, i) => colour(stops, i / (stops.length - 1))).join(", ") + ")";
  }

  const S = { D: null, metric: null, selected: null, items: {}, seq: 0 };

  async function boot() {
    let D = JSON.parse($("data").textContent);
    if (D === null) {
      status("loading the sweep ...");
      try {
        const r = await fetch("/api/sweep", { cache: "no-store" });
        D = await r.json();
        if (!r.ok) throw new Error(D.error || "HTTP " + r.status);
      } catch (e) {
        status("Cannot load the sweep from the server: " + e.message, true);
        return;
      }
    }
    S.D = D;
    S.items = D.items || {};
    $("subtitle").textContent = D.subtitle;
    $("mode-badge").textContent = D.served
      ? "served by sam2-layerwise view: any number of items per head; kept runs open in the viewer"
      : "opened from disk: the 10 items per head that changed most (sam2-layerwise view OUT serves more, and opens kept runs)";
    $("items-controls").hidden = !D.served;
    const sel = $("metric");
    for (const [m, label] of D.metrics) sel.appendChild(el("option", { value: m, text: label }));
    S.metric = D.metrics.length ? D.metrics[0][0] : null;
    sel.addEventListener("change", () => { S.metric = sel.value; drawGrid(); if (S.selected) showItems(S.selected); });
    $("top-n").addEventListener("change", () => { if (S.selected) showItems(S.selected); });
    $("grid").addEventListener("click", (ev) => {
      const td = ev.target.closest("td[data-key]");
      if (td) showItems({ layer: td.dataset.layer, head: parseInt(td.dataset.head, 10) });
    });
    drawGrid();
    layersTable();
    unitsTable();
    status("");
    document.body.dataset.loaded = "1";
  }

  // -- heatmap ------------------------------------------------------------------------------------------------
  function scaleOf(values) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (lo === Infinity) { lo = 0; hi = 1; }
    if (lo < 0 && hi > 0) { const b = Math.max(-lo, hi); return { lo: -b, hi: b, stops: DIV }; }
    if (hi <= lo) hi = lo + 1e-12;
    return { lo, hi, stops: SEQ };
  }

  function drawGrid() {
    const D = S.D, g = $("grid");
    clear(g);
    if (!S.metric || !D.layers.length) {
      g.appendChild(el("tr", {}, [el("td", { cls: "lab", text: "no per-head metrics in this sweep" })]));
      return;
    }
    const cells = D.cells[S.metric];
    const sc = scaleOf(Object.values(cells));
    const legend = $("legend");
    clear(legend);
    legend.appendChild(el("span", { text: fmt(sc.lo) }));
    legend.appendChild(el("span", { cls: "legend-bar", style: { background: gradient(sc.stops) } }));
    legend.appendChild(el("span", { text: fmt(sc.hi) }));
    legend.appendChild(el("span", { text: D.metrics.find((m) => m[0] === S.metric)[1] }));
    const head = el("tr", {}, [el("td", { cls: "lab", text: "layer \\ head" })]);
    for (let h = 0; h < D.heads; h++) head.appendChild(el("td", { cls: "hd", text: String(h) }));
    g.appendChild(head);
    for (const L of D.layers) {
      const tr = el("tr", {}, [el("td", { cls: "lab", text: L.label, title: L.key })]);
      for (let h = 0; h < D.heads; h++) {
        const k = L.key + "#" + h;
        if (!(k in cells)) { tr.appendChild(el("td", { cls: "none" })); continue; }
        const v = cells[k];
        const sel = S.selected && S.selected.layer === L.key && S.selected.head === h;
        tr.appendChild(el("td", {
          cls: (v === null ? "na" : "") + (sel ? " sel" : ""), title: L.label + ", head " + h + ": " + fmt(v),
          data: { key: k, layer: L.key, head: String(h), value: String(v) },
          style: v === null ? null : { background: colour(sc.stops, (v - sc.lo) / (sc.hi - sc.lo)) },
        }));
      }
      g.appendChild(tr);
    }
  }

  // -- the items of one head ----------------------------------------------------------------------------------
  function itemMetric() { return S.D.metrics.find((m) => m[0] === S.metric)[2]; }

  async function showItems(sel) {
    const D = S.D;
    S.selected = sel;
    for (const td of document.querySelectorAll("#grid td.sel")) td.classList.remove("sel");
    const cell = document.querySelector('#grid td[data-key="' + CSS.escape(sel.layer + "#" + sel.head) + '"]');
    if (cell) cell.classList.add("sel");
    const L = D.layers.find((x) => x.key === sel.layer);
    const metric = itemMetric();
    const info = D.item_metrics[metric];
    const seq = ++S.seq;
    let rows;
    if (D.served) {
      const n = $("top-n").value;
      status("asking for the items of " + L.label + " head " + sel.head + " ...");
      try {
        const r = await fetch("/api/sweep/items?layer=" + encodeURIComponent(L.layer_key) + "&call=" + L.call +
          "&head=" + sel.head + "&metric=" + encodeURIComponent(metric) + "&n=" + n, { cache: "no-store" });
        const answer = await r.json();
        if (!r.ok) throw new Error(answer.error || "HTTP " + r.status);
        if (seq !== S.seq) return;
        Object.assign(S.items, answer.items);
        rows = answer.rows;
      } catch (e) {
        if (seq === S.seq) status("The server did not list the items: " + e.message, true);
        return;
      }
      status("");
    } else {
      rows = ((D.top || {})[metric] || {})[sel.layer + "#" + sel.head] || [];
    }
    $("items-title").textContent = L.label + ", head " + sel.head + ": the items where it changed most";
    $("items-note").textContent = "Ranked by the head's " + info.label + " on each item, " + info.most + " first (" +
      rows.length + " listed). Mask IoU: the item's FP and Q masks (chosen by predicted IoU).";
    const t = $("items");
    clear(t);
    t.appendChild(el("thead", {}, [el("tr", {}, ["#", "item", "image", "prompt", info.label, "mask IoU FP vs Q", "run"]
      .map((c, i) => el("th", { text: c, cls: i === 2 || i === 3 ? "text" : null })))]));
    const body = el("tbody");
    rows.forEach(([item, value], i) => {
      const m = S.items[String(item)] || {};
      const prompt = (m.prompt || "") + (m.points ? " (" + m.points + ")" : "") + (m.box ? " box " + m.box : "");
      const run = m.run
        ? el("a", { href: m.run, cls: "run", text: D.served ? "open in the viewer" : "kept run",
          title: D.served ? "this item's compare run in the viewer" : "its folder; serve the sweep with sam2-layerwise view to open it" })
        : el("span", { cls: "note", text: "not kept", title: "rerun the sweep with --keep-runs to keep each item's run" });
      body.appendChild(el("tr", { data: { item: String(item), value: String(value) } }, [
        el("td", { text: String(i + 1) }), el("td", { text: String(item) }), el("td", { cls: "text", text: m.image || "" }),
        el("td", { cls: "text", text: prompt }), el("td", { cls: "value", text: fmt(value) }),
        el("td", { text: fmt(m.iou) }), el("td", {}, [run])]));
    });
    t.appendChild(body);
    document.body.dataset.items = sel.layer + "#" + sel.head + "|" + metric + "|" + rows.length;
  }

  // -- layers and attribution units ---------------------------------------------------------------------------
  function table(id, rows, cols) {
    const t = $(id);
    clear(t);
    if (!rows.length) return;
    t.appendChild(el("thead", {}, [el("tr", {}, cols.map(([, label, , title], i) => el("th", { text: label, cls: i === 0 ? "text" : null, title })))]));
    t.appendChild(el("tbody", {}, rows.map((r) => el("tr", { data: { key: String(r[cols[0][0]]) } },
      cols.map(([c, , f], i) => el("td", { cls: i === 0 ? "text" : null, data: { value: String(r[c]) }, text: (f || fmt)(r[c]) }))))));
  }

  function layersTable() {
    const causal = S.D.layer_rows.some((r) => r.attribution_delta_iou_mean !== null && r.attribution_delta_iou_mean !== undefined);
    const cols = [["layer", "layer", String], ["kind", "kind", String], ["n_items", "items"], ["js_mean", "JS mean"],
      ["js_p95", "JS p95"], ["out_rel_err_mean", "output rel. error"],
      ["spearman_js_iou_loss", "Spearman ρ (JS, IoU loss)", null, "correlational, over spearman_n items"]];
    if (causal) cols.push(["attribution_delta_iou_mean", "attribution ΔIoU mean", signed, "causal"],
      ["attribution_delta_iou_min", "ΔIoU min", signed], ["attribution_delta_iou_max", "ΔIoU max", signed]);
    table("layers", S.D.layer_rows, cols);
  }

  function unitsTable() {
    const units = S.D.units;
    $("units-panel").hidden = !units.length;
    if (!units.length) return;
    const mode = units[0].mode;
    $("units-title").textContent = "Attribution (" + mode + " mode): the causal change of mask IoU per layer";
    $("units-note").textContent = (mode === "restore"
      ? "ΔIoU = IoU(Q with only this unit restored to full precision, FP) − IoU(Q, FP): > 0 means quantizing it costs that much IoU (red)."
      : "ΔIoU = IoU(FP with only this unit quantized, FP) − 1: < 0 is what quantizing it alone costs (red).") +
      " Bars: mean over items, the black line min to max; units in model order.";
    let bound = 0;
    for (const u of units) for (const v of [u.delta_iou_mean, u.delta_iou_min, u.delta_iou_max]) if (v !== null) bound = Math.max(bound, Math.abs(v));
    const pos = (v) => 50 + 50 * v / (bound || 1);
    const t = $("units");
    clear(t);
    t.appendChild(el("thead", {}, [el("tr", {}, ["unit", "kind", "quantizers", "items", "ΔIoU over items (bars to ±" + fmt(bound) + ")",
      "ΔIoU mean", "median", "min", "max", "chosen mask changed"].map((c, i) => el("th", { text: c, cls: i === 0 ? "text" : null })))]));
    t.appendChild(el("tbody", {}, units.map((u) => {
      const v = u.delta_iou_mean === null ? 0 : u.delta_iou_mean;
      const cost = mode === "restore" ? v > 0 : v < 0;
      const track = el("td", { cls: "bar-track" }, [el("div", { cls: "bar-axis" }),
        el("div", { cls: "bar" + (cost ? " cost" : ""), style: { left: Math.min(pos(v), 50) + "%", width: Math.abs(pos(v) - 50) + "%" } })]);
      if (u.delta_iou_min !== null && u.delta_iou_max !== null) {
        track.appendChild(el("div", { cls: "whisker", style: { left: pos(u.delta_iou_min) + "%", width: (pos(u.delta_iou_max) - pos(u.delta_iou_min)) + "%" } }));
      }
      return el("tr", { data: { unit: u.unit, delta: String(u.delta_iou_mean) } }, [
        el("td", { cls: "text", text: u.unit }), el("td", { text: u.kind }), el("td", { text: fmt(u.sites) }),
        el("td", { text: fmt(u.n_items) }), track, el("td", { cls: "value", text: signed(u.delta_iou_mean) }),
        el("td", { text: signed(u.delta_iou_median) }), el("td", { text: signed(u.delta_iou_min) }),
        el("td", { text: signed(u.delta_iou_max) }),
        el("td", { text: u.chosen_changed_rate === null ? "n/a" : fmt(100 * u.chosen_changed_rate) + "%" })]);
    })));
  }

  window.addEventListener("error", (ev) => status("page error: " + ev.message, true));
  window.addEventListener("unhandledrejection", (ev) => status("page error: " + (ev.reason && ev.reason.message || ev.reason), true));
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
