/* sam2-layerwise viewer. Plain JavaScript, no build step, no network beyond the run's own files.
 *
 * Data comes as <script> files that call SAM2LW.register(kind, id, data) (a page opened from disk cannot
 * fetch() its neighbours): viewer_data/index.js for the run, viewer_data/layers/L<i>.js per attention call,
 * loaded only when that call is selected. Served by `sam2-layerwise view`, the page also asks /api/query for
 * the attention of any clicked place. Every map arrives already placed on its key grid by the Python renderer's
 * code; here cell (r, c) of a real grid (h, w) is drawn over photo pixels [c*W/w, (c+1)*W/w) x [r*H/h, (r+1)*H/h)
 * (nearest neighbour, as the PNG overlays). Text from files goes through textContent only.
 *
 * A video run (index.video) adds a frame selector: the photograph, masks, heatmap rows and layer list are those of
 * the selected frame; a memory cross-attention call draws the query's attention over each memory frame on that
 * frame's own photograph (viewer_data/frames/), its own frame first with the query marked, and the object
 * pointers' share as a bar.
 */
(function () {
  "use strict";

  // -- data loading -------------------------------------------------------------------------------------
  const waiting = new Map();
  const loaded = new Map();
  window.SAM2LW = {
    register(kind, id, data) {
      const key = kind + ":" + id;
      loaded.set(key, data);
      const w = waiting.get(key);
      if (w) { waiting.delete(key); w.resolve(data); }
    },
  };

  function loadData(kind, id, src) {
    const key = kind + ":" + id;
    if (loaded.has(key)) return Promise.resolve(loaded.get(key));
    if (waiting.has(key)) return waiting.get(key).promise;
    let resolve, reject;
    const promise = new Promise((a, b) => { resolve = a; reject = b; });
    waiting.set(key, { promise, resolve, reject });
    const s = document.createElement("script");
    s.src = src;
    s.async = true;
    s.onerror = () => { waiting.delete(key); reject(new Error("cannot load " + src)); };
    s.onload = () => {
      if (waiting.has(key)) { waiting.delete(key); reject(new Error(src + " did not register its data")); }
    };
    document.head.appendChild(s);
    return promise;
  }

  // The server's endpoints, relative to the page (RUN/<page>/index.html -> RUN/api/): the same page works at the
  // server's root and for a sweep's kept run served under /runs/<name>/.
  const API = "../api/";

  // -- small helpers ------------------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const e = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === "text") e.textContent = v;
        else if (k === "cls") e.className = v;
        else if (k === "data") for (const [dk, dv] of Object.entries(v)) e.dataset[dk] = dv;
        else if (k === "style") Object.assign(e.style, v);
        else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v);
      }
    }
    for (const c of children || []) if (c !== null && c !== undefined) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return e;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
    if (typeof v !== "number") return String(v);
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e-3 && a < 1e5) return v.toPrecision(digits || 4).replace(/\.?0+$/, (m) => (m.startsWith(".") ? "" : m));
    return v.toExponential((digits || 4) - 2);
  }

  function decode(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);  // little-endian float32, as written
  }

  function lut(hex) {
    const out = new Uint8Array(hex.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
    return out;
  }

  function status(text, isError) {
    const s = $("status");
    s.textContent = text || "";
    s.className = isError ? "error" : "";
  }

  function message(text) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
  }

  // -- state ----------------------------------------------------------------------------------------------
  const S = {
    index: null, server: false, cm: {}, photo: null, masks: {}, layersById: new Map(),
    video: null, frameImgs: new Map(),  // a video run: its frames, and each frame's photograph once loaded
    sel: { layer: null, head: null, query: null, metric: null, mask: 0, frame: null },
    click: null,  // {x, y, layer, call, entry | null, token | null, message}
    seq: 0,
  };
  const NOT_A_KEY = [48, 48, 48];
  const ALPHA = 0.6, DIM = 0.35;

  function colour(table, t) {
    const i = Math.max(0, Math.min(255, Math.round(t * 255))) * 3;
    return [table[i], table[i + 1], table[i + 2]];
  }

  function scaleBar(container, table, lo, hi, what, extra) {
    clear(container);
    const c = el("canvas", { width: 256, height: 1 });
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) {
      img.data[4 * i] = table[3 * i]; img.data[4 * i + 1] = table[3 * i + 1];
      img.data[4 * i + 2] = table[3 * i + 2]; img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    container.appendChild(el("span", { text: fmt(lo, 3), cls: "lo" }));
    container.appendChild(c);
    container.appendChild(el("span", { text: fmt(hi, 3), cls: "hi" }));
    if (what) container.appendChild(el("span", { text: what }));
    if (extra) container.appendChild(el("span", { text: extra }));
  }

  // -- boot -------------------------------------------------------------------------------------------------
  async function boot() {
    status("loading the run ...");
    let index;
    try {
      index = await loadData("index", "index", "viewer_data/index.js");
    } catch (e) {
      status("Cannot load viewer_data/index.js next to this page: " + e.message, true);
      return;
    }
    S.index = index;
    S.video = index.video && Array.isArray(index.video.frames) && index.video.frames.length ? index.video : null;
    for (const [k, v] of Object.entries(index.cmaps)) S.cm[k] = lut(v);
    for (const l of index.layers) S.layersById.set(l.id, l);
    S.units = new Map(((index.attribution || {}).units || []).map((u) => [u.unit, u]));
    if (location.protocol === "http:" || location.protocol === "https:") {
      try {
        const r = await fetch(API + "info", { cache: "no-store" });
        if (r.ok) S.server = !!(await r.json()).server;
      } catch (e) { S.server = false; }
    }
    header();
    const first = firstSelection();
    if (S.video) frameControls(first ? S.layersById.get(first.layer).frame : S.video.prompt_frame);
    heatmapControls();
    drawHeatmap();
    document.body.dataset.heatmapMs = String(Math.round(performance.now()));  // since navigation (benchmarks)
    ranking();
    attribution();
    impact();
    photoControls();
    attentionControls();
    document.body.dataset.ready = "1";
    status("");
    await loadPhoto();
    if (S.video) await framePhoto(S.sel.frame);
    drawPhoto();
    if (first) await selectLayer(first.layer, first.head, null);
    document.body.dataset.loaded = "1";
  }

  function firstSelection() {
    const r = (S.index.ranking || [])[0];
    if (r) {
      const l = S.index.layers.find((x) => x.key === r.layer_key && x.call === r.call_index && x.file);
      if (l) return { layer: l.id, head: r.head };
    }
    const l = S.index.layers.find((x) => x.file);
    return l ? { layer: l.id, head: null } : null;
  }

  function isCompare() { return S.index.kind === "compare"; }
  function sides() { return S.index.sides.map((s) => s.id); }

  function header() {
    const ix = S.index;
    document.title = "sam2-layerwise: " + ix.title;
    $("title").textContent = ix.title;
    const parts = [];
    if (ix.models && ix.models.fp) parts.push("FP " + (ix.models.fp.checkpoint || ix.models.fp.config || "?"));
    if (ix.models && ix.models.q) parts.push("Q " + (ix.models.q.checkpoint || "?"));
    if (ix.quantization) parts.push("quantization " + ix.quantization);
    parts.push(ix.frame.orig_w + "x" + ix.frame.orig_h + " px at " + ix.frame.image_size);
    if (S.video) parts.push("video: " + S.video.frames.length + " frames, clicks on frame " + S.video.prompt_frame);
    $("subtitle").textContent = parts.join(" · ");
    $("mode-badge").textContent = S.server
      ? "served by sam2-layerwise view: click anywhere on the photograph"
      : "opened from disk: precomputed queries (run 'sam2-layerwise view' to click anywhere)";
    $("photo-hint").textContent = S.server
      ? "Click any point of the photograph (or of a map) to see the attention of the token there, at the selected layer."
      : "Click a captured query place to select it. Any other place needs the server: sam2-layerwise view RUN_DIR.";
    if (!isCompare()) {
      $("fig-q").hidden = true; $("fig-diff").hidden = true;
      $("mask-q-label").hidden = true;
      $("ranking-panel").hidden = true;
      $("impact-title").textContent = "Prediction";
      $("heatmap-title").textContent = "Layer × head: attention statistics of this model";
    }
    $("mask-fp-name").textContent = isCompare() ? "FP" : "model";
  }

  // -- photograph -----------------------------------------------------------------------------------------
  function loadImage(src) {
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => resolve(null);
      img.src = src;
    });
  }

  async function loadPhoto() {
    const p = S.index.photo;
    S.photoW = p.width; S.photoH = p.height;
    const jobs = [loadImage(p.src).then((img) => { S.photo = img; })];
    for (const s of S.index.sides) {
      S.masks[s.id] = [];
      if (S.video) continue;  // one mask per frame: loaded with its frame (framePhoto)
      s.masks.forEach((m, i) => jobs.push(loadImage(m.src).then((img) => { S.masks[s.id][i] = img; })));
    }
    await Promise.all(jobs);
    if (!S.photo) status("Cannot load the photograph " + p.src, true);
    $("photo-note").textContent = p.note || "";
  }

  // The photograph shown: the selected frame's in a video run.
  function currentPhoto() { return S.video ? S.frameImgs.get(S.sel.frame) || null : S.photo; }

  // A frame's photograph and each side's mask on it, loaded once (a promise of the photograph).
  function framePhoto(f) {
    if (!S.video || !Number.isInteger(f) || f < 0 || f >= S.video.frames.length) return Promise.resolve(null);
    if (S.frameImgs.has(f)) return Promise.resolve(S.frameImgs.get(f));
    const fr = S.video.frames[f];
    const jobs = S.index.sides.map((s) => (s.masks[f] ? loadImage(s.masks[f].src).then((img) => { S.masks[s.id][f] = img; }) : null));
    jobs.push(loadImage(fr.photo).then((img) => {
      S.frameImgs.set(f, img);
      if (!img) status("Cannot load frame " + f + ": " + fr.photo, true);
    }));
    return Promise.all(jobs).then(() => S.frameImgs.get(f));
  }

  // The frames a layer's maps are drawn on: its own, and the memory frames of a memory cross-attention.
  function ensurePhotos(layer, maps) {
    if (!S.video || !layer) return Promise.resolve();
    const want = new Set([layer.frame]);
    for (const m of maps || []) for (const seg of m.segments || []) if (seg.kind === "memory") want.add(seg.frame);
    return Promise.all([...want].map(framePhoto));
  }

  function toPhoto(x, y) { return [x * S.photoW / S.index.frame.orig_w, y * S.photoH / S.index.frame.orig_h]; }

  function outline(ctx, box, colourCss) {
    if (!box) return;
    const [x0, y0] = toPhoto(box[0], box[1]);
    const [x1, y1] = toPhoto(box[2], box[3]);
    ctx.lineWidth = 3; ctx.strokeStyle = "#000";
    ctx.strokeRect(x0 - 2.5, y0 - 2.5, x1 - x0 + 5, y1 - y0 + 5);
    ctx.lineWidth = 2; ctx.strokeStyle = colourCss || "#00ffff";
    ctx.strokeRect(x0 - 1, y0 - 1, x1 - x0 + 2, y1 - y0 + 2);
  }

  function cross(ctx, x, y, r, css) {
    const [px, py] = toPhoto(x, y);
    ctx.lineWidth = 3; ctx.strokeStyle = "#000";
    ctx.beginPath(); ctx.moveTo(px - r, py); ctx.lineTo(px + r, py); ctx.moveTo(px, py - r); ctx.lineTo(px, py + r); ctx.stroke();
    ctx.lineWidth = 1.5; ctx.strokeStyle = css;
    ctx.beginPath(); ctx.moveTo(px - r, py); ctx.lineTo(px + r, py); ctx.moveTo(px, py - r); ctx.lineTo(px, py + r); ctx.stroke();
  }

  function drawPrompts(ctx) {
    const p = S.index.prompts || {};
    const r = Math.max(4, Math.round(Math.min(S.photoW, S.photoH) / 80));
    for (const [x, y, label] of p.points || []) {
      const [px, py] = toPhoto(x, y);
      ctx.beginPath(); ctx.arc(px, py, r, 0, 2 * Math.PI);
      ctx.fillStyle = label === 1 ? "rgb(0,220,0)" : "rgb(230,30,30)"; ctx.fill();
      ctx.lineWidth = 2; ctx.strokeStyle = "#fff"; ctx.stroke();
    }
    if (p.box) {
      const [x0, y0] = toPhoto(p.box[0], p.box[1]);
      const [x1, y1] = toPhoto(p.box[2], p.box[3]);
      ctx.lineWidth = 2; ctx.strokeStyle = "rgb(255,200,0)"; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
    for (const [x, y] of p.queries || []) cross(ctx, x, y, r, "#fff");
  }

  function drawPhoto() {
    const c = $("photo");
    c.width = S.photoW; c.height = S.photoH;
    const ctx = c.getContext("2d");
    const photo = currentPhoto();
    if (photo) ctx.drawImage(photo, 0, 0, S.photoW, S.photoH);
    const alpha = parseFloat($("mask-opacity").value);
    for (const side of sides()) {
      const box = $(side === "fp" ? "mask-fp" : "mask-q");
      const img = (S.masks[side] || [])[S.sel.mask];
      if (box && box.checked && img) {
        ctx.globalAlpha = alpha;
        ctx.drawImage(img, 0, 0, S.photoW, S.photoH);
        ctx.globalAlpha = 1;
      }
    }
    const layer = S.layersById.get(S.sel.layer);
    if (S.server && layer && layer.click && layer.click.mode === "saved") {
      // light runs keep q/k only of the windows holding the captured queries: where a click can be answered
      ctx.setLineDash([6, 4]); ctx.lineWidth = 1.5; ctx.strokeStyle = "#fff";
      for (const b of layer.click.boxes || []) {
        const [x0, y0] = toPhoto(b[0], b[1]);
        const [x1, y1] = toPhoto(b[2], b[3]);
        ctx.strokeRect(x0 + 0.5, y0 + 0.5, x1 - x0 - 1, y1 - y0 - 1);
      }
      ctx.setLineDash([]);
    }
    if ($("show-prompts").checked) drawPrompts(ctx);
    const tok = currentToken();
    if (tok && tok.pixel_box) outline(ctx, tok.pixel_box);
    if (S.click) cross(ctx, S.click.x, S.click.y, 7, "#ff00ff");
  }

  function photoControls() {
    const sel = $("mask-index");
    const fp = S.index.sides[0];
    const n = Math.max(...S.index.sides.map((s) => s.masks.length), 0);
    for (let i = 0; i < n; i++) {
      const tags = S.index.sides.filter((s) => s.best === i).map((s) => (isCompare() ? s.id.toUpperCase() : "") + " best");
      sel.appendChild(el("option", { value: String(i), text: "mask " + i + (tags.length ? " (" + tags.join(", ").trim() + ")" : "") }));
    }
    S.sel.mask = S.video ? S.sel.frame : fp && typeof fp.best === "number" ? fp.best : 0;
    sel.value = String(S.sel.mask);
    $("mask-index-label").hidden = !!S.video;  // a video run: one mask per frame, the selected frame's
    sel.addEventListener("change", () => { S.sel.mask = parseInt(sel.value, 10); drawPhoto(); markImpactRow(); });
    for (const id of ["mask-fp", "mask-q", "show-prompts"]) $(id).addEventListener("change", drawPhoto);
    $("mask-opacity").addEventListener("input", drawPhoto);
    $("photo").addEventListener("click", (ev) => onPhotoClick(ev, $("photo")));
  }

  function eventToOriginal(ev, canvas) {
    const r = canvas.getBoundingClientRect();
    const fw = S.index.frame.orig_w, fh = S.index.frame.orig_h;
    const x = Math.min(fw - 1e-3, Math.max(0, (ev.clientX - r.left) * fw / r.width));
    const y = Math.min(fh - 1e-3, Math.max(0, (ev.clientY - r.top) * fh / r.height));
    return [x, y];
  }

  // -- output impact ------------------------------------------------------------------------------------
  function impact() {
    const box = $("impact");
    clear(box);
    const ix = S.index;
    if (!isCompare()) {
      const s = ix.sides[0];
      const rows = s.masks.map((m, i) => el("tr", { cls: "clickable" + (s.best === i ? " chosen" : ""), data: { mask: String(i) } }, [
        el("td", { text: String(i) + (s.best === i ? " (best)" : "") }), el("td", { text: fmt(m.pred_iou) }),
        el("td", { text: fmt(m.area * 100, 3) + "%" })]));
      box.appendChild(el("table", { id: "impact-table" }, [
        el("thead", {}, [el("tr", {}, [el("th", { text: S.video ? "frame" : "mask" }), el("th", { text: "predicted IoU" }), el("th", { text: "area" })])]),
        el("tbody", {}, rows)]));
    } else if (ix.impact) {
      const imp = ix.impact;
      const rows = imp.masks.map((m) => el("tr", {
        cls: "clickable" + (imp.chosen.fp === m.index || imp.chosen.q === m.index ? " chosen" : ""), data: { mask: String(m.index) },
      }, [
        el("td", { text: String(m.index) + (imp.chosen.fp === m.index ? " FP" : "") + (imp.chosen.q === m.index ? " Q" : "") }),
        el("td", { text: fmt(m.iou) }), el("td", { text: fmt(m.area_fp * 100, 3) + "%" }), el("td", { text: fmt(m.area_q * 100, 3) + "%" }),
        el("td", { text: fmt(m.pred_iou_fp) }), el("td", { text: fmt(m.pred_iou_q) }), el("td", { text: fmt(m.pred_iou_change, 3) }),
      ]));
      box.appendChild(el("table", { id: "impact-table" }, [
        el("thead", {}, [el("tr", {}, [S.video ? "frame" : "mask", "IoU FP vs Q", "area FP", "area Q", "pred. IoU FP", "pred. IoU Q", "Δ pred. IoU"]
          .map((t) => el("th", { text: t })))]),
        el("tbody", {}, rows)]));
      const ch = imp.chosen;
      if (S.video) {
        box.appendChild(el("p", { id: "impact-chosen", text: "One row per frame: the mask SAM 2 kept on that frame in each model, and the IoU of the two." }));
      } else {
        box.appendChild(el("p", { id: "impact-chosen", text: "Chosen mask (highest predicted IoU): FP " + ch.fp + ", Q " + ch.q +
          (ch.changed ? " (CHANGED)" : " (same)") + "; IoU of the two chosen masks " + fmt(ch.iou) + "." }));
      }
      const lg = imp.logits || {};
      box.appendChild(el("p", { cls: "note", text: "Low-res logits: max |Δ| " + fmt(lg.max_abs_error) + ", mean |Δ| " +
        fmt(lg.mean_abs_error) + ", sign agreement " + fmt(lg.sign_agreement) + ". Mean IoU over outputs " + fmt(imp.iou_mean) + "." }));
    } else {
      box.appendChild(el("p", { cls: "note", text: "no output impact in this analysis" }));
    }
    box.addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-mask]");
      if (!tr) return;
      if (S.video) { selectFrame(parseInt(tr.dataset.mask, 10)); return; }
      S.sel.mask = parseInt(tr.dataset.mask, 10);
      $("mask-index").value = tr.dataset.mask;
      drawPhoto(); markImpactRow();
    });
    markImpactRow();
  }

  function markImpactRow() {
    for (const tr of document.querySelectorAll("#impact tr[data-mask]")) tr.classList.toggle("selected", tr.dataset.mask === String(S.sel.mask));
  }

  // -- heatmap ------------------------------------------------------------------------------------------------
  function heatmapControls() {
    const hm = S.index.heatmap;
    const sel = $("metric");
    for (const c of hm.columns) sel.appendChild(el("option", { value: c.key, text: c.label }));
    const want = hm.columns.find((c) => c.key === S.index.heatmap_default) || hm.columns[0];
    S.sel.metric = want ? want.key : null;
    if (want) sel.value = want.key;
    sel.addEventListener("change", () => { S.sel.metric = sel.value; drawHeatmap(); });
    $("log-scale").addEventListener("change", drawHeatmap);
    const box = $("heatmap");
    box.addEventListener("click", (ev) => {
      const cell = ev.target.closest(".hm-cell");
      if (cell) { selectLayer(cell.dataset.layer, parseInt(cell.dataset.head, 10), null); return; }
      const label = ev.target.closest(".hm-label");
      if (label) selectLayer(label.dataset.layer, S.sel.head, null);
    });
    box.addEventListener("mousemove", (ev) => {
      const cell = ev.target.closest(".hm-cell");
      if (!cell) { $("tooltip").hidden = true; return; }
      showTooltip(ev, heatmapTip(cell.dataset.layer, parseInt(cell.dataset.head, 10)));
    });
    box.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
    $("heatmap-note").textContent = "Rows: attention calls in model order; columns: heads (blank: the layer has no such head; grey: undefined). " +
      (S.index.scope ? "Measured over " + S.index.scope + ". " : "") + "Click a cell to show that layer and head.";
  }

  function showTooltip(ev, text) {
    const t = $("tooltip");
    t.textContent = text;
    t.hidden = false;
    t.style.left = Math.min(window.innerWidth - 260, ev.clientX + 14) + "px";
    t.style.top = (ev.clientY + 14) + "px";
  }

  function heatmapTip(layerId, head) {
    const hm = S.index.heatmap;
    const li = hm.layers.indexOf(layerId);
    const layer = S.layersById.get(layerId);
    const lines = [(layer ? layer.label : layerId) + ", head " + head];
    const col = hm.columns.find((c) => c.key === S.sel.metric);
    if (col) lines.push(col.label + ": " + fmt(hm.values[col.key][li][head], 5));
    for (const c of hm.columns.slice(0, 8)) if (!col || c.key !== col.key) lines.push(c.key + ": " + fmt(hm.values[c.key][li][head], 4));
    const u = layer && S.units.get(layer.key);
    if (u) lines.push("layer ΔIoU (causal, " + S.index.attribution.mode + "): " + signed(u.delta_iou));
    return lines.join("\n");
  }

  function metricScale(col, values) {
    let lo = Infinity, hi = -Infinity;
    for (const row of values) for (const v of row) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (lo === Infinity) { lo = 0; hi = 1; }
    const diverging = col.diverging || (lo < 0 && hi > 0);
    const log = !diverging && $("log-scale").checked && lo > 0;
    if (diverging) { const b = Math.max(Math.abs(lo), Math.abs(hi)) || 1; lo = -b; hi = b; }
    const f = log ? Math.log10 : (v) => v;
    const a = f(lo), b = f(hi);
    return { lo, hi, log, table: diverging ? S.cm.div : S.cm.seq, t: (v) => (b > a ? (f(v) - a) / (b - a) : 0.5) };
  }

  function drawHeatmap() {
    const hm = S.index.heatmap;
    const box = $("heatmap");
    clear(box);
    const col = hm.columns.find((c) => c.key === S.sel.metric);
    if (!col || !hm.layers.length) {
      box.appendChild(el("p", { cls: "note", text: "no per-head metrics in this run" }));
      clear($("heatmap-scale"));
      return;
    }
    const values = hm.values[col.key];
    const sc = metricScale(col, values);  // one scale over every frame's calls: frames compare by colour
    box.style.gridTemplateColumns = "minmax(120px, max-content) repeat(" + hm.heads + ", minmax(14px, 1fr))";
    box.appendChild(el("div", { cls: "hm-head", text: "layer \\ head" }));
    for (let h = 0; h < hm.heads; h++) box.appendChild(el("div", { cls: "hm-head", text: String(h) }));
    hm.layers.forEach((id, li) => {
      const layer = S.layersById.get(id);
      if (S.video && layer && layer.frame !== S.sel.frame) return;  // a video run: the selected frame's calls
      box.appendChild(el("div", { cls: "hm-label", text: layer ? layer.label : id, title: layer ? layer.key : id, data: { layer: id } }));
      const present = new Set(hm.present[li]);
      for (let h = 0; h < hm.heads; h++) {
        if (!present.has(h)) { box.appendChild(el("div", { cls: "hm-none" })); continue; }
        const v = values[li][h];
        const cell = el("div", { cls: "hm-cell" + (v === null ? " nan" : ""), data: { layer: id, head: String(h) } });
        if (v !== null) {
          const [r, g, b] = colour(sc.table, sc.t(v));
          cell.style.background = "rgb(" + r + "," + g + "," + b + ")";
        }
        box.appendChild(cell);
      }
    });
    scaleBar($("heatmap-scale"), sc.table, sc.lo, sc.hi, col.label + (sc.log ? " (log scale)" : ""));
    markHeatmap();
  }

  function markHeatmap() {
    for (const c of document.querySelectorAll("#heatmap .selected")) c.classList.remove("selected");
    if (!S.sel.layer) return;
    const head = S.sel.head === null ? null : String(S.sel.head);
    for (const c of document.querySelectorAll("#heatmap [data-layer]")) {
      if (c.dataset.layer !== S.sel.layer) continue;
      if (c.classList.contains("hm-label") || c.dataset.head === head) c.classList.add("selected");
    }
  }

  // -- ranking ------------------------------------------------------------------------------------------------
  function ranking() {
    const box = $("ranking");
    clear(box);
    const rows = S.index.ranking || [];
    if (!rows.length) { box.appendChild(el("p", { cls: "note", text: "no ranking" })); return; }
    const causal = S.units.size > 0;
    const head = ["#", "layer", "head", "JS mean", "JS p95", "top-k overlap", "q err", "k err", "v err", "out err"];
    const at = 4;  // the causal column right beside the correlational JS mean
    if (causal) head.splice(at, 0, "layer ΔIoU (causal)");
    const body = rows.map((r) => {
      const l = S.index.layers.find((x) => x.key === r.layer_key && x.call === r.call_index);
      const cells = [
        el("td", { text: String(r.rank) }), el("td", { cls: "text", text: l ? l.label : r.layer || r.layer_key }), el("td", { text: String(r.head) }),
        el("td", { text: fmt(r.js_mean, 3) }), el("td", { text: fmt(r.js_p95, 3) }), el("td", { text: fmt(r.topk_overlap, 3) }),
        el("td", { text: fmt(r.q_rel_err, 3) }), el("td", { text: fmt(r.k_rel_err, 3) }), el("td", { text: fmt(r.v_rel_err, 3) }),
        el("td", { text: fmt(r.out_rel_err, 3) })];
      if (causal) {
        const u = S.units.get(r.layer_key);
        cells.splice(at, 0, el("td", { cls: "causal", text: u ? signed(u.delta_iou) : "not run", data: u ? { delta: String(u.delta_iou) } : null }));
      }
      return el("tr", { cls: "clickable", data: { layer: l ? l.id : "", head: String(r.head) } }, cells);
    });
    const titles = { 3: "correlational: how much this head's attention changed (Jensen–Shannon divergence, bits)" };
    if (causal) titles[at] = "causal: change of the chosen mask's IoU against FP when this head's whole layer is " +
      (S.index.attribution.mode === "restore" ? "restored to full precision" : "the only one quantized");
    box.appendChild(el("table", { id: "ranking-table" }, [
      el("thead", {}, [el("tr", {}, head.map((t, i) => el("th", { text: t, cls: i === 1 ? "text" : null, title: titles[i] })))]),
      el("tbody", {}, body)]));
    box.addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-layer]");
      if (tr && tr.dataset.layer) selectLayer(tr.dataset.layer, parseInt(tr.dataset.head, 10), null);
    });
  }

  // -- causal attribution (compare --attribute) ----------------------------------------------------------------
  function signed(v) { return v === null || v === undefined ? "n/a" : (v > 0 ? "+" : "") + fmt(v, 4); }

  function costs(v) {
    // restore: restoring the layer gives IoU back (> 0); isolate: quantizing it alone loses IoU (< 0)
    return v !== null && (S.index.attribution.mode === "restore" ? v > 0 : v < 0);
  }

  function attribution() {
    const a = S.index.attribution;
    $("attribution-panel").hidden = !a;
    if (!a) return;
    $("attribution-title").textContent = "Causal attribution: ΔIoU per layer (" + a.mode + " mode)";
    const base = a.units.find((u) => u.baseline_iou !== null);
    $("attribution-note").textContent = "Each bar: " + a.definition + (base && a.mode === "restore"
      ? " (the quantized model's chosen mask has IoU " + fmt(base.baseline_iou) + " with FP's)" : "") +
      ". Causal: one rerun per layer with only that layer changed. The heatmap and the JS ranking are correlational: " +
      "how much attention changed, not whether the mask paid for it. Red: this layer's quantization costs IoU. " +
      "Rows without a layer (embeddings, neck, decoder MLPs and heads) have no attention to show.";
    $("attribution-order").addEventListener("change", drawAttribution);
    $("attribution").addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-layer]");
      if (tr && tr.dataset.layer) selectLayer(tr.dataset.layer, S.sel.head, null);
    });
    drawAttribution();
  }

  function drawAttribution() {
    const a = S.index.attribution;
    const box = $("attribution");
    clear(box);
    const units = a.units.slice();
    if ($("attribution-order").value === "effect") {
      units.sort((x, y) => Math.abs(y.delta_iou || 0) - Math.abs(x.delta_iou || 0) || x.order - y.order);
    }
    let bound = 0;
    for (const u of units) if (u.delta_iou !== null) bound = Math.max(bound, Math.abs(u.delta_iou));
    const rows = units.map((u) => {
      const v = u.delta_iou;
      const w = v === null || !(bound > 0) ? 0 : 50 * Math.abs(v) / bound;  // % of the track; zero in the middle
      const bar = el("div", { cls: "attr-bar" + (costs(v) ? " cost" : ""), style: { width: w + "%", left: v < 0 ? (50 - w) + "%" : "50%" } });
      const label = (S.layersById.get(u.layer) || {}).label || u.unit;
      return el("tr", { cls: u.layer ? "clickable" : "no-layer", data: { unit: u.unit, layer: u.layer || "", delta: String(v) },
        title: u.unit + " (" + u.kind + ", " + u.sites + " quantizers; " + (u.restart || "") + "): IoU " + fmt(u.iou, 5) +
          ", baseline " + fmt(u.baseline_iou, 5) + ", ΔIoU " + signed(v) + (u.chosen_changed ? "; the chosen mask changed" : "") }, [
        el("td", { cls: "text", text: label }),
        el("td", { cls: "attr-track" }, [el("div", { cls: "attr-axis" }), bar]),
        el("td", { cls: "attr-value", text: signed(v) })]);
    });
    box.appendChild(el("table", { id: "attribution-table" }, [
      el("thead", {}, [el("tr", {}, [el("th", { cls: "text", text: "layer (unit)" }),
        el("th", { text: "ΔIoU, bars to ±" + fmt(bound || 0, 3) }), el("th", { text: "ΔIoU (causal)" })])]),
      el("tbody", {}, rows)]));
    markAttribution();
  }

  function markAttribution() {
    for (const tr of document.querySelectorAll("#attribution tr[data-unit]")) {
      tr.classList.toggle("selected", !!tr.dataset.layer && tr.dataset.layer === S.sel.layer);
    }
  }

  function markRanking() {
    for (const tr of document.querySelectorAll("#ranking tr[data-layer]")) {
      tr.classList.toggle("selected", tr.dataset.layer === S.sel.layer && tr.dataset.head === String(S.sel.head));
    }
  }

  // -- attention ------------------------------------------------------------------------------------------------
  function attentionControls() {
    const sel = $("layer");
    fillLayers();
    sel.addEventListener("change", () => selectLayer(sel.value, S.sel.head, S.sel.query));
    $("head").addEventListener("change", () => {
      const v = $("head").value;
      S.sel.head = v === "mean" ? null : parseInt(v, 10);
      markHeatmap(); markRanking(); drawMaps();
    });
    $("query").addEventListener("change", () => { S.sel.query = $("query").value; drawMaps(); drawPhoto(); });
    $("draw-on").addEventListener("change", drawMaps);
    for (const side of ["fp", "q", "diff"]) {
      const c = $("map-" + side);
      c.addEventListener("click", (ev) => { if ($("draw-on").value === "photo") onPhotoClick(ev, c); });
      c.addEventListener("mousemove", (ev) => hoverMap(ev, c));
      c.addEventListener("mouseleave", () => { $("hover-info").textContent = ""; });
    }
  }

  // The layer list: every attention call, or the selected frame's in a video run.
  function fillLayers() {
    const sel = $("layer");
    clear(sel);
    for (const l of S.index.layers) {
      if (S.video && l.frame !== S.sel.frame) continue;
      sel.appendChild(el("option", { value: l.id, text: l.label + (l.file ? "" : " (nothing saved)"), data: { frame: String(l.frame) } }));
    }
    if (S.sel.layer) sel.value = S.sel.layer;
  }

  // -- frames (video runs) ------------------------------------------------------------------------------------
  function frameWords(f) {
    const parts = ["frame " + f.index + " (" + f.name + (f.source_index !== null ? ", source frame " + f.source_index : "") + ")"];
    if (f.index === S.video.prompt_frame) parts.push("the clicks are on this frame");
    else if (f.direction) parts.push("tracked " + f.direction);
    const m = f.memory;
    if (m && m.memory_frames) {
      parts.push("memory of frames " + m.memory_frames.join(", ") + (m.conditioning_frames && m.conditioning_frames.length ? " (conditioning " + m.conditioning_frames.join(", ") + ")" : "") +
        (m.pointer_frames && m.pointer_frames.length ? ", object pointers of " + m.pointer_frames.join(", ") : ""));
    } else {
      parts.push("no memory attention on this frame");
    }
    return parts.join(" · ");
  }

  function frameControls(start) {
    const v = S.video;
    $("frame-panel").hidden = false;
    const slider = $("frame");
    slider.max = String(v.frames.length - 1);
    slider.addEventListener("input", () => selectFrame(parseInt(slider.value, 10)));
    const list = $("frame-list");
    for (const f of v.frames) {
      const tag = f.index === v.prompt_frame ? " (clicks)" : f.memory ? "" : " (no memory)";
      list.appendChild(el("button", { type: "button", data: { frame: String(f.index) }, text: f.index + ": " + f.name + tag, title: frameWords(f) }));
    }
    list.addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-frame]");
      if (b) selectFrame(parseInt(b.dataset.frame, 10));
    });
    $("frame-note").textContent = (v.note ? v.note + ". " : "") + "The photograph, masks, heatmap rows and layer list show the selected frame; " +
      "a memory cross-attention call shows the query's attention over each memory frame, drawn on that frame.";
    setFrame(Number.isInteger(start) ? start : v.prompt_frame);
  }

  // The selected frame's state and controls (the caller draws).
  function setFrame(f) {
    S.sel.frame = f; S.sel.mask = f;
    $("frame").value = String(f);
    for (const b of document.querySelectorAll("#frame-list button")) b.classList.toggle("selected", b.dataset.frame === String(f));
    $("frame-label").textContent = frameWords(S.video.frames[f]);
    $("frame-panel").dataset.frame = String(f);
    fillLayers();
    if (S.index.heatmap && S.sel.metric !== null) drawHeatmap();
    markImpactRow();
  }

  async function selectFrame(f) {
    if (!S.video || !Number.isInteger(f) || f < 0 || f >= S.video.frames.length || f === S.sel.frame) return;
    const current = S.layersById.get(S.sel.layer);
    setFrame(f);
    const here = S.index.layers.filter((l) => l.frame === f);
    const next = (current && here.find((l) => l.key === current.key && l.file)) || here.find((l) => l.file) || here[0];
    if (next) { await selectLayer(next.id, S.sel.head, S.sel.query); return; }
    S.sel.layer = null; S.layerData = null;
    await framePhoto(f);
    fillQueries(); drawMaps(); drawPhoto();
    message("no attention call was captured on frame " + f);
  }

  function clickNote(layer) {
    const mode = layer && layer.click ? layer.click.mode : "none";
    if (mode === "tokens") return "This call's queries are decoder tokens, not places: pick one in the query list.";
    if (mode === "none") return "This run saved no q/k for this call: the page shows its selected queries only" +
      (S.server ? "; a click cannot be recomputed here (compare --save-full-attn keeps what recomputes any place)." : ".");
    if (!S.server) return "Opened from disk: the selected queries only (sam2-layerwise view RUN_DIR recomputes a clicked place).";
    return mode === "saved" ? "A click is recomputed inside the outlined windows (the run kept q/k there only)."
      : "A click anywhere on the photograph re-selects the query there and recomputes its attention from the saved q/k.";
  }

  async function selectLayer(id, head, query) {
    const layer = S.layersById.get(id);
    if (!layer) return;
    const seq = ++S.seq;
    if (S.video && layer.frame !== S.sel.frame) setFrame(layer.frame);
    S.sel.layer = id;
    $("layer").value = id;
    $("click-note").textContent = clickNote(layer);
    S.sel.head = head === undefined ? S.sel.head : head;
    if (S.sel.head !== null && S.sel.head >= layer.heads) S.sel.head = null;
    fillHeads(layer);
    markHeatmap(); markRanking(); markAttribution();
    message("");
    let data = null;
    if (layer.file) {
      status("loading " + layer.label + " ...");
      try {
        data = await loadData("layer", layer.id, layer.file);
      } catch (e) {
        if (seq === S.seq) status("Cannot load " + layer.file + ": " + e.message, true);
        return;
      }
      if (seq !== S.seq) return;
      status("");
    }
    if (S.video) {
      await ensurePhotos(layer, data ? data.maps : null);
      if (seq !== S.seq) return;
    }
    S.layerData = data;
    if (S.server && layer.click && layer.click.mode !== "tokens" && layer.click.mode !== "none") {
      fetch(API + "prepare?layer=" + encodeURIComponent(layer.key) + "&call=" + layer.call, { cache: "no-store" }).catch(() => {});
    }
    const labels = data ? data.maps.map((m) => m.label) : [];
    const keep = query && (labels.includes(query) || query === "@click") ? query : S.sel.query;
    S.sel.query = keep && (labels.includes(keep) || (keep === "@click" && S.click && S.click.layer === id)) ? keep : labels[0] || null;
    if (S.click && S.click.layer !== id) {
      // the clicked place stays selected across layers: ask the server for it at this layer
      if (S.server && layer.click && ["any", "saved"].includes(layer.click.mode)) {
        fillQueries();
        await queryServer(S.click.x, S.click.y);
        return;
      }
      S.click = null;
    }
    fillQueries();
    drawMaps(); drawPhoto();
    if (!data) message(layer.note || "nothing saved for this call");
  }

  function fillHeads(layer) {
    const sel = $("head");
    clear(sel);
    sel.appendChild(el("option", { value: "mean", text: "mean over heads" }));
    for (let h = 0; h < layer.heads; h++) sel.appendChild(el("option", { value: String(h), text: "head " + h }));
    sel.value = S.sel.head === null ? "mean" : String(S.sel.head);
  }

  function fillQueries() {
    const sel = $("query");
    clear(sel);
    const data = S.layerData;
    if (S.click && S.click.entry) {
      sel.appendChild(el("option", { value: "@click", text: "clicked (" + Math.round(S.click.x) + ", " + Math.round(S.click.y) + ")" }));
    }
    for (const m of data ? data.maps : []) {
      const kind = m.kind === "to_token" ? "image tokens attending to " + m.label.slice(3) : m.kind === "token" ? "token " + m.label : m.label;
      sel.appendChild(el("option", { value: m.label, text: kind }));
    }
    if (S.sel.query) sel.value = S.sel.query;
  }

  function currentEntry() {
    if (S.sel.query === "@click") return S.click && S.click.entry ? S.click.entry : null;
    const data = S.layerData;
    if (!data) return null;
    return data.maps.find((m) => m.label === S.sel.query) || null;
  }

  function currentToken() {
    if (S.click && S.click.layer === S.sel.layer && S.sel.query === "@click") return S.click.token;
    if (S.click && S.click.layer === S.sel.layer && !S.click.entry) return S.click.token;
    const e = currentEntry();
    return e ? e.token : null;
  }

  function headValues(entry, head) {
    let h = entry.heads.find((x) => x.head === head);
    if (!h) h = entry.heads[0];
    if (!h._d) {
      h._d = {};
      for (const side of sides()) if (h[side]) h._d[side] = decode(h[side]);
    }
    return { head: h.head, values: h._d };
  }

  function realRange(entry, values) {
    // min/max over keys that have pixels (window padding excluded), as the PNG renderer scales its colours
    let hi = -Infinity;
    const blk = entry.block, bw = blk[3] - blk[2];
    const rh = entry.real_hw ? entry.real_hw[0] : Infinity, rw = entry.real_hw ? entry.real_hw[1] : Infinity;
    for (let i = 0; i < values.length; i++) {
      const r = blk[0] + Math.floor(i / bw), c = blk[2] + (i % bw);
      if (r < rh && c < rw && Number.isFinite(values[i])) hi = Math.max(hi, values[i]);
    }
    return hi;
  }

  function tokenText(tok, entry) {
    if (!tok) {
      if (entry && entry.kind === "token") return "query: decoder token " + entry.label;
      if (entry && entry.kind === "to_token") return "image tokens attending to decoder token " + entry.label.slice(3);
      return "";
    }
    const parts = ["query " + (tok.label || "") + ": token (" + tok.cell[0] + ", " + tok.cell[1] + ")"];
    if (tok.grid_hw) parts[0] += " of the " + tok.grid_hw[0] + "×" + tok.grid_hw[1] + " query grid";
    if (tok.window_rc) parts.push("window (" + tok.window_rc[0] + ", " + tok.window_rc[1] + ")");
    if (tok.group !== null && tok.group !== undefined) parts.push("group " + tok.group + ", index " + tok.index);
    if (tok.source_cells) parts.push("pooled from key rows " + tok.source_cells[0] + "–" + (tok.source_cells[1] - 1) + ", cols " + tok.source_cells[2] + "–" + (tok.source_cells[3] - 1));
    if (tok.key_block) parts.push("keys: rows " + tok.key_block[0] + "–" + (tok.key_block[1] - 1) + ", cols " + tok.key_block[2] + "–" + (tok.key_block[3] - 1));
    if (tok.pixel_box) parts.push("pixels [" + tok.pixel_box.map((v) => fmt(v, 4)).join(", ") + ")");
    return parts.join(" · ");
  }

  function setTokenInfo(tok, entry) {
    const t = $("token-info");
    t.textContent = tokenText(tok, entry);
    const d = t.dataset;
    for (const k of Object.keys(d)) delete d[k];
    if (tok) {
      d.row = tok.cell[0]; d.col = tok.cell[1];
      if (tok.grid_hw) { d.gridH = tok.grid_hw[0]; d.gridW = tok.grid_hw[1]; }
      if (tok.group !== null && tok.group !== undefined) { d.group = tok.group; d.index = tok.index; }
      d.label = tok.label || "";
    }
  }

  function drawMaps() {
    const layer = S.layersById.get(S.sel.layer);
    const entry = currentEntry();
    const maps = $("maps");
    const tokens = $("tokens");
    const tok = currentToken();
    setTokenInfo(tok, entry);
    maps.dataset.layer = layer ? layer.key + "#" + layer.call : "";
    maps.dataset.head = S.sel.head === null ? "mean" : String(S.sel.head);
    maps.dataset.query = S.sel.query || "";
    if (S.click && S.click.layer === S.sel.layer && S.click.message && !S.click.entry) message(S.click.message);
    $("memory").hidden = !(entry && entry.display === "memory");
    if (!entry) {
      for (const side of ["fp", "q", "diff"]) blank($("map-" + side), side);
      tokens.hidden = true; maps.hidden = false;
      maps.dataset.drawn = "";
      $("map-notes").textContent = "";
      return;
    }
    const { head, values } = headValues(entry, S.sel.head);
    const headWords = head === null ? "mean over heads" : "head " + head;
    const notes = entry.notes || {};
    const names0 = { fp: isCompare() ? "FP" : "model", q: "Q" };
    $("map-notes").textContent = sides().filter((s) => notes[s]).map((s) => names0[s] + ": " + notes[s]).join("; ");
    let sum = 0;
    for (const s of sides()) for (let i = 0; i < values[s].length; i++) if (Number.isFinite(values[s][i])) sum += values[s][i] * (i % 7 + 1);
    maps.dataset.drawn = [maps.dataset.layer, maps.dataset.head, entry.label, sum.toPrecision(8)].join("|");
    if (entry.display === "tokens") {
      maps.hidden = true; tokens.hidden = false;
      drawTokens(entry, values, headWords);
      return;
    }
    if (entry.display === "memory") {
      maps.hidden = true; tokens.hidden = true;
      drawMemory(entry, values, headWords, layer);
      S.drawn = { entry, values };
      return;
    }
    maps.hidden = false; tokens.hidden = true;
    let vmax = 0;
    for (const s of sides()) vmax = Math.max(vmax, realRange(entry, values[s]));
    if (!(vmax > 0)) vmax = 1;
    const grid = $("draw-on").value === "grid";
    const what = "attention probability per key token (" + headWords + ")";
    const names = { fp: isCompare() ? "FP (float)" : "model", q: "Q (quantized)" };
    for (const s of sides()) {
      const fig = $("fig-" + s);
      fig.querySelector("figcaption").textContent = names[s] + " · " + headWords;
      fig.querySelector("figcaption").title = (layer ? layer.label : "") + " · " + queryWords(entry);
      const colourOf = (v) => colour(S.cm.attn, v / vmax);
      draw($("map-" + s), entry, values[s], colourOf, grid);
      scaleBar(fig.querySelector(".scale"), S.cm.attn, 0, vmax, what, isCompare() ? "FP and Q share this scale" : null);
    }
    if (isCompare()) {
      const diff = new Float32Array(values.fp.length);
      for (let i = 0; i < diff.length; i++) diff[i] = values.q[i] - values.fp[i];
      let d = 0;
      const blk = entry.block, bw = blk[3] - blk[2];
      for (let i = 0; i < diff.length; i++) {
        const r = blk[0] + Math.floor(i / bw), c = blk[2] + (i % bw);
        if (r < entry.real_hw[0] && c < entry.real_hw[1] && Number.isFinite(diff[i])) d = Math.max(d, Math.abs(diff[i]));
      }
      const bound = d > 0 ? d : 1e-12;
      const fig = $("fig-diff");
      fig.querySelector("figcaption").textContent = "Q − FP · " + headWords;
      fig.querySelector("figcaption").title = (layer ? layer.label : "") + " · " + queryWords(entry);
      draw($("map-diff"), entry, diff, (v) => colour(S.cm.div, (v + bound) / (2 * bound)), grid);
      scaleBar(fig.querySelector(".scale"), S.cm.div, -bound, bound, "difference of probabilities, Q − FP (" + headWords + ")");
      S.diff = diff;
    }
    S.drawn = { entry, values };
  }

  function queryWords(entry) {
    if (entry.kind === "to_token") return "image tokens → " + entry.label.slice(3);
    if (entry.kind === "token") return "token " + entry.label;
    return "query " + (entry.label === "click" ? "clicked" : entry.label);
  }

  function blank(canvas) {
    canvas.width = S.photoW || 16; canvas.height = S.photoH || 16;
    const ctx = canvas.getContext("2d");
    const photo = currentPhoto();
    if (photo) { ctx.globalAlpha = 0.35; ctx.drawImage(photo, 0, 0, canvas.width, canvas.height); ctx.globalAlpha = 1; }
  }

  function draw(canvas, entry, values, colourOf, onGrid) {
    if (onGrid) drawOnGrid(canvas, entry, values, colourOf);
    else drawOnPhoto(canvas, entry, values, colourOf);
  }

  // values over entry.block of the key grid entry.real_hw, over the photograph (by default the one shown; a
  // memory frame's own for memory cross-attention)
  function drawOnPhoto(canvas, entry, values, colourOf, photo) {
    const W = S.photoW, H = S.photoH;
    canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext("2d");
    const under = photo === undefined ? currentPhoto() : photo;
    if (under) ctx.drawImage(under, 0, 0, W, H);
    const [rh, rw] = entry.real_hw;
    const [r0, r1, c0, c1] = entry.block;
    const bw = c1 - c0;
    const heat = document.createElement("canvas");
    heat.width = rw; heat.height = rh;
    const hctx = heat.getContext("2d");
    const img = hctx.createImageData(rw, rh);
    const a = Math.round(ALPHA * 255), dim = Math.round((1 - DIM) * 255);
    for (let r = 0; r < rh; r++) {
      for (let c = 0; c < rw; c++) {
        const o = 4 * (r * rw + c);
        if (r >= r0 && r < r1 && c >= c0 && c < c1) {
          const v = values[(r - r0) * bw + (c - c0)];
          const rgb = Number.isFinite(v) ? colourOf(v) : NOT_A_KEY;
          img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = a;
        } else {
          img.data[o + 3] = dim;  // not a key of this query: the photograph dimmed
        }
      }
    }
    hctx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(heat, 0, 0, W, H);
    if (entry.query_box) outline(ctx, entry.query_box);
    const r = Math.max(4, Math.round(Math.min(W, H) / 60));
    for (const [x, y] of entry.marks || []) {
      const [px, py] = toPhoto(x, y);
      ctx.lineWidth = 3; ctx.strokeStyle = "#000"; ctx.beginPath(); ctx.arc(px, py, r + 1, 0, 2 * Math.PI); ctx.stroke();
      ctx.lineWidth = 2; ctx.strokeStyle = "#00ffff"; ctx.beginPath(); ctx.arc(px, py, r, 0, 2 * Math.PI); ctx.stroke();
    }
    canvas.dataset.view = "photo";
  }

  function drawOnGrid(canvas, entry, values, colourOf) {
    const [gh, gw] = entry.grid_hw;
    const [rh, rw] = entry.real_hw;
    const s = Math.max(1, Math.floor(512 / Math.max(gh, gw)));
    canvas.width = gw * s; canvas.height = gh * s;
    const ctx = canvas.getContext("2d");
    const cells = document.createElement("canvas");
    cells.width = gw; cells.height = gh;
    const cctx = cells.getContext("2d");
    const img = cctx.createImageData(gw, gh);
    const [r0, r1, c0, c1] = entry.block;
    const bw = c1 - c0;
    for (let r = 0; r < gh; r++) {
      for (let c = 0; c < gw; c++) {
        const o = 4 * (r * gw + c);
        let rgb = NOT_A_KEY;
        if (r >= r0 && r < r1 && c >= c0 && c < c1) {
          const v = values[(r - r0) * bw + (c - c0)];
          if (Number.isFinite(v)) rgb = colourOf(v);
        }
        img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
      }
    }
    cctx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(cells, 0, 0, gw * s, gh * s);
    const lw = Math.max(1, Math.round(Math.max(gh, gw) * s / 256));  // ~2 px once the canvas is shown smaller
    ctx.lineWidth = lw; ctx.strokeStyle = "#fff";
    if (rh !== gh || rw !== gw) {  // window padding: keys without pixels, beyond this line
      ctx.beginPath(); ctx.moveTo(0, rh * s); ctx.lineTo(rw * s, rh * s); ctx.lineTo(rw * s, 0); ctx.stroke();
    }
    if (entry.window) {
      const [w0, w1, v0, v1] = entry.window;
      ctx.strokeRect(v0 * s + lw / 2, w0 * s + lw / 2, (v1 - v0) * s - lw, (w1 - w0) * s - lw);
    }
    if (entry.query_cells) {
      const [q0, q1, p0, p1] = entry.query_cells;
      ctx.lineWidth = Math.max(lw, Math.min(2 * lw, Math.floor(s / 2)));
      ctx.strokeStyle = "#00ffff";
      ctx.strokeRect(p0 * s - 1, q0 * s - 1, (p1 - p0) * s + 2, (q1 - q0) * s + 2);
    }
    canvas.dataset.view = "grid";
  }

  // -- memory cross-attention: the query's frame, then each memory frame with the query's attention on it -------
  function segValues(values, seg) { return values.subarray(seg.offset, seg.offset + seg.length); }

  function segSum(values, seg) {
    let t = 0;
    for (const v of segValues(values, seg)) if (Number.isFinite(v)) t += v;
    return t;
  }

  function pct(v) { return Number.isFinite(v) ? (100 * v).toFixed(1) + "%" : "n/a"; }

  function drawMemory(entry, values, headWords, layer) {
    const box = $("memory");
    clear(box);
    const segs = entry.segments || [];
    const spatial = segs.filter((g) => g.kind === "memory" && Array.isArray(g.grid_hw))
      .sort((a, b) => (b.conditioning ? 1 : 0) - (a.conditioning ? 1 : 0) || (a.age || 0) - (b.age || 0));
    const pointers = segs.filter((g) => g.kind === "object_pointer");
    const names = { fp: isCompare() ? "FP" : "model", q: "Q" };
    let vmax = 0, dmax = 0;
    for (const g of spatial) {
      for (const s of sides()) for (const v of segValues(values[s], g)) if (Number.isFinite(v)) vmax = Math.max(vmax, v);
      if (isCompare()) {
        const a = segValues(values.fp, g), b = segValues(values.q, g);
        for (let i = 0; i < a.length; i++) if (Number.isFinite(b[i] - a[i])) dmax = Math.max(dmax, Math.abs(b[i] - a[i]));
      }
    }
    if (!(vmax > 0)) vmax = 1;
    const bound = dmax > 0 ? dmax : 1e-12;
    const colourOf = (v) => colour(S.cm.attn, v / vmax);
    box.dataset.panels = String(spatial.length);
    // the query's own frame, its token outlined
    const own = layer ? layer.frame : S.sel.frame;
    const qc = el("canvas", { width: 16, height: 16 });
    qc.width = S.photoW; qc.height = S.photoH;
    const qctx = qc.getContext("2d");
    const ownPhoto = S.frameImgs.get(own);
    if (ownPhoto) qctx.drawImage(ownPhoto, 0, 0, S.photoW, S.photoH);
    if (entry.query_box) outline(qctx, entry.query_box);
    box.appendChild(el("figure", { cls: "mem-query", data: { frame: String(own) } }, [
      el("figcaption", { text: "frame " + own + ": the query's own frame (" + queryWords(entry) + ", outlined) · " + headWords }), qc]));
    if (!spatial.length) box.appendChild(el("p", { cls: "note", text: "no memory frame in this call's keys (SAM 2's no-memory token only)" }));
    for (const g of spatial) {
      const shares = sides().map((s) => names[s] + " " + pct(segSum(values[s], g)));
      const fig = el("figure", { cls: "mem-panel", data: { label: g.label, frame: String(g.frame) } }, [
        el("figcaption", { text: g.label + ": memory of frame " + g.frame + (g.conditioning ? " (conditioning)" : "") + ", age " + g.age +
          ", drawn on frame " + g.frame + " · share of the attention: " + shares.join(", ") })]);
      const row = el("div", { cls: "mem-maps" });
      const place = { real_hw: g.grid_hw, block: [0, g.grid_hw[0], 0, g.grid_hw[1]], query_box: entry.query_box, marks: [] };
      const photo = S.frameImgs.get(g.frame) || null;
      for (const s of sides()) {
        const c = el("canvas", { width: 16, height: 16, cls: "mem-map", data: { side: s, sum: String(segSum(values[s], g)) } });
        drawOnPhoto(c, place, segValues(values[s], g), colourOf, photo);
        row.appendChild(el("div", {}, [el("span", { cls: "hint", text: names[s] }), c]));
      }
      if (isCompare()) {
        const a = segValues(values.fp, g), b = segValues(values.q, g);
        const diff = new Float32Array(a.length);
        for (let i = 0; i < a.length; i++) diff[i] = b[i] - a[i];
        const c = el("canvas", { width: 16, height: 16, cls: "mem-map", data: { side: "diff" } });
        drawOnPhoto(c, place, diff, (v) => colour(S.cm.div, (v + bound) / (2 * bound)), photo);
        row.appendChild(el("div", {}, [el("span", { cls: "hint", text: "Q − FP" }), c]));
      }
      fig.appendChild(row);
      box.appendChild(fig);
    }
    const bars = el("div", { cls: "mem-pointers", data: { segments: pointers.map((g) => g.label).join(",") } });
    for (const s of sides()) {
      const v = pointers.reduce((t, g) => t + segSum(values[s], g), 0);
      bars.dataset["share" + s.charAt(0).toUpperCase() + s.slice(1)] = String(v);
      bars.appendChild(el("div", { cls: "mem-bar-row" }, [
        el("span", { text: names[s] + ": object pointers (" + pointers.length + " frames) " + pct(v) }),
        el("div", { cls: "mem-bar", title: pct(v) + " of the attention on the object-pointer tokens" }, [
          el("div", { cls: "mem-bar-fill", style: { width: (100 * Math.max(0, Math.min(1, v))) + "%" } })])]));
    }
    box.appendChild(bars);
    const sc = el("div", { cls: "scale" });
    scaleBar(sc, S.cm.attn, 0, vmax, "attention probability per memory token (" + headWords + ")", "one scale for all memory frames" + (isCompare() ? ", FP and Q" : ""));
    box.appendChild(sc);
    if (isCompare()) {
      const dc = el("div", { cls: "scale" });
      scaleBar(dc, S.cm.div, -bound, bound, "Q − FP");
      box.appendChild(dc);
    }
  }

  function drawTokens(entry, values, headWords) {
    const box = $("tokens");
    clear(box);
    const roles = entry.roles || [];
    let vmax = 0;
    for (const s of sides()) for (const v of values[s]) if (Number.isFinite(v)) vmax = Math.max(vmax, v);
    if (!(vmax > 0)) vmax = 1;
    const rows = [];
    const names = { fp: isCompare() ? "FP" : "model", q: "Q" };
    for (const s of sides()) {
      rows.push(el("tr", {}, [el("th", { text: names[s] }), ...Array.from(values[s], (v) => {
        const [r, g, b] = Number.isFinite(v) ? colour(S.cm.attn, v / vmax) : NOT_A_KEY;
        return el("td", { cls: "cell", text: fmt(v, 3), style: { background: "rgb(" + r + "," + g + "," + b + ")" } });
      })]));
    }
    if (isCompare()) {
      let d = 0;
      const diff = Array.from(values.q, (v, i) => v - values.fp[i]);
      for (const v of diff) if (Number.isFinite(v)) d = Math.max(d, Math.abs(v));
      const bound = d > 0 ? d : 1e-12;
      rows.push(el("tr", {}, [el("th", { text: "Q − FP" }), ...diff.map((v) => {
        const [r, g, b] = Number.isFinite(v) ? colour(S.cm.div, (v + bound) / (2 * bound)) : NOT_A_KEY;
        return el("td", { cls: "cell", text: fmt(v, 3), style: { background: "rgb(" + r + "," + g + "," + b + ")" } });
      })]));
    }
    box.appendChild(el("p", { cls: "hint", text: queryWords(entry) + " · " + headWords + ": its keys are decoder tokens (no pixels); colours 0 to " + fmt(vmax, 3) + ", differences on a diverging scale" }));
    box.appendChild(el("table", { id: "token-table" }, [
      el("thead", {}, [el("tr", {}, [el("th", { text: "key token" }), ...roles.map((r) => el("th", { text: r }))])]),
      el("tbody", {}, rows)]));
  }

  function hoverMap(ev, canvas) {
    const d = S.drawn;
    if (!d || !d.entry || d.entry.display !== "grid" || canvas.dataset.view !== "photo") { $("hover-info").textContent = ""; return; }
    const [x, y] = eventToOriginal(ev, canvas);
    const [rh, rw] = d.entry.real_hw;
    const r = Math.floor(y * rh / S.index.frame.orig_h), c = Math.floor(x * rw / S.index.frame.orig_w);
    const [r0, r1, c0, c1] = d.entry.block;
    if (r < r0 || r >= r1 || c < c0 || c >= c1) { $("hover-info").textContent = "key (" + r + ", " + c + "): not a key of this query"; return; }
    const i = (r - r0) * (c1 - c0) + (c - c0);
    const parts = sides().map((s) => (s === "fp" && isCompare() ? "FP " : s === "q" ? "Q " : "") + fmt(d.values[s][i], 4));
    if (isCompare()) parts.push("Q − FP " + fmt(d.values.q[i] - d.values.fp[i], 3));
    $("hover-info").textContent = "key (" + r + ", " + c + "): " + parts.join(", ");
  }

  // -- clicks on the photograph -----------------------------------------------------------------------------
  function onPhotoClick(ev, canvas) {
    S.clickStart = performance.now();
    const [x, y] = eventToOriginal(ev, canvas);
    const layer = S.layersById.get(S.sel.layer);
    if (!layer) return;
    if (S.server) {
      const mode = layer.click ? layer.click.mode : "none";
      if (mode === "tokens") {
        message("The queries of " + layer.label + " are decoder tokens, not places of the photograph: pick a token in the query list.");
        return;
      }
      queryServer(x, y);
      return;
    }
    const data = S.layerData;
    const hit = data && data.maps.find((m) => m.token && m.token.pixel_box && x >= m.token.pixel_box[0] && x < m.token.pixel_box[2] &&
      y >= m.token.pixel_box[1] && y < m.token.pixel_box[3]);
    if (hit) {
      S.sel.query = hit.label; $("query").value = hit.label; message("");
      drawMaps(); drawPhoto();
    } else {
      message("Opened from disk, this page holds only the captured query tokens (" + (data ? data.maps.map((m) => m.label).join(", ") : "none") +
        "). To see the attention of any place, serve the run: sam2-layerwise view RUN_DIR");
    }
  }

  async function queryServer(x, y) {
    const layer = S.layersById.get(S.sel.layer);
    const seq = ++S.seq;
    status("computing the attention at (" + Math.round(x) + ", " + Math.round(y) + ") ...");
    let answer;
    try {
      const r = await fetch(API + "query?layer=" + encodeURIComponent(layer.key) + "&call=" + layer.call + "&x=" + x.toFixed(3) + "&y=" + y.toFixed(3), { cache: "no-store" });
      answer = await r.json();
      if (!r.ok) answer = { ok: false, message: answer.error || ("HTTP " + r.status) };
    } catch (e) {
      answer = { ok: false, message: "the server did not answer (" + e.message + "); is sam2-layerwise view still running?" };
    }
    if (seq !== S.seq) return;
    if (S.video && answer.ok) {
      await ensurePhotos(layer, [answer.map]);
      if (seq !== S.seq) return;
    }
    status("");
    S.click = { x, y, layer: layer.id, entry: answer.ok ? answer.map : null, token: answer.token || null, message: answer.ok ? null : answer.message };
    document.body.dataset.clickX = String(x);  // the place asked for, in original pixels
    document.body.dataset.clickY = String(y);
    if (answer.ok) { S.sel.query = "@click"; message(""); } else {
      message(answer.message);
      if (S.sel.query === "@click") S.sel.query = S.layerData && S.layerData.maps[0] ? S.layerData.maps[0].label : null;
    }
    fillQueries();
    drawMaps(); drawPhoto();
    if (S.clickStart !== undefined) document.body.dataset.clickMs = (performance.now() - S.clickStart).toFixed(1);
    document.body.dataset.clicks = String((parseInt(document.body.dataset.clicks || "0", 10)) + 1);
  }

  window.addEventListener("error", (ev) => status("viewer error: " + ev.message, true));
  window.addEventListener("unhandledrejection", (ev) => status("viewer error: " + (ev.reason && ev.reason.message || ev.reason), true));
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
