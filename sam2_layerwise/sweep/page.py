"""`sweep/index.html`: one self-contained page (no network, no server) — the aggregated layer x head heatmap;
clicking a head lists the items where it changed most; the layer table (Spearman, attribution)."""

from __future__ import annotations

import html
import json
import math

import pandas as pd

_METRICS = (("js_mean_mean", "mean JS (mean over items)"), ("js_mean_p95", "mean JS (p95 over items)"),
            ("out_rel_err_mean", "attention output rel. error"), ("entropy_norm_delta_mean", "entropy change"))


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def sweep_page(hs: pd.DataFrame, ls: pd.DataFrame, at: pd.DataFrame, top: dict, summary: dict,
               runs: dict[int, str]) -> str:
    layers = [{"key": f"{r.layer_key}#{r.call_index}", "label": r.layer} for r in
              hs[["layer_key", "call_index", "layer", "order"]].drop_duplicates().itertuples()]
    cells = {m: {f"{r.layer_key}#{r.call_index}#{r.head}": _num(getattr(r, m)) for r in hs.itertuples()}
             for m, _ in _METRICS if m in hs}
    heads = int(hs["head"].max()) + 1 if len(hs) else 0
    data = {"layers": layers, "heads": heads, "cells": cells, "metrics": [[m, t] for m, t in _METRICS if m in cells],
            "top": top, "runs": {str(k): v for k, v in runs.items()},
            "layer_rows": [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()}
                           for r in ls.to_dict("records")],
            "units": [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in
                      at.to_dict("records")] if not at.empty else []}
    payload = json.dumps(data, default=lambda o: None).replace("</", "<\\/")
    items = summary["items"]
    head = (f"{items['ok']} items measured ({items['failed']} failed); mean IoU of FP and Q masks "
            f"{'n/a' if items['iou_mean'] is None else format(items['iou_mean'], '.4f')}")
    return _TEMPLATE.replace("@SUBTITLE@", html.escape(head)).replace("@DATA@", payload)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sam2-layerwise sweep</title>
<style>
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 4px} .sub{color:#555;margin-bottom:12px}
#wrap{display:flex;gap:18px;align-items:flex-start}
table.grid{border-collapse:collapse} table.grid td{width:22px;height:16px;border:1px solid #fff;cursor:pointer}
table.grid td.lab{width:auto;cursor:default;text-align:right;padding-right:6px;white-space:nowrap;font-size:11px}
table.grid td.na{background:#ddd} table.grid td.sel{outline:2px solid #e00}
#side{min-width:360px} table.list{border-collapse:collapse;font-size:12px}
table.list td,table.list th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left}
#legend{font-size:11px;color:#555;margin:6px 0}
</style></head><body>
<h1>Float vs quantized over a dataset</h1><div class="sub">@SUBTITLE@</div>
<label>metric <select id="metric"></select></label>
<div id="legend"></div>
<div id="wrap"><div><table class="grid" id="grid"></table></div>
<div id="side"><b id="title">click a head</b><table class="list" id="items"></table></div></div>
<h2 style="font-size:15px">Layers</h2><table class="list" id="layers"></table>
<h2 style="font-size:15px" id="uhead"></h2><table class="list" id="units"></table>
<script id="data" type="application/json">@DATA@</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const sel = document.getElementById('metric');
for (const [m, t] of D.metrics) { const o = document.createElement('option'); o.value = m; o.textContent = t; sel.appendChild(o); }
function colour(t) {  // viridis, 5 stops
  const s = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
  t = Math.max(0, Math.min(1, t)) * 4; const i = Math.min(3, Math.floor(t)), f = t - i;
  const c = s[i].map((v, k) => Math.round(v + f * (s[i + 1][k] - v))); return `rgb(${c})`;
}
const fmt = v => v === null || v === undefined ? 'n/a' : Number.isInteger(v) ? String(v) :
  (Math.abs(v) < 1e-3 ? v.toExponential(2) : v.toFixed(4));
function draw() {
  const cells = D.cells[sel.value] || {}; const vals = Object.values(cells).filter(v => v !== null);
  const lo = Math.min(...vals, 0), hi = Math.max(...vals, 1e-12);
  document.getElementById('legend').textContent = `colour: ${fmt(lo)} (dark) to ${fmt(hi)} (yellow); grey: undefined; blank: no such head`;
  const g = document.getElementById('grid'); g.innerHTML = '';
  const hr = g.insertRow(); hr.insertCell().className = 'lab';
  for (let h = 0; h < D.heads; h++) { const c = hr.insertCell(); c.textContent = h; c.className = 'lab'; c.style.textAlign = 'center'; }
  for (const L of D.layers) {
    const r = g.insertRow(); const l = r.insertCell(); l.className = 'lab'; l.textContent = L.label;
    for (let h = 0; h < D.heads; h++) {
      const k = `${L.key}#${h}`; const c = r.insertCell();
      if (!(k in cells)) { c.style.cursor = 'default'; continue; }
      const v = cells[k]; if (v === null) c.className = 'na'; else c.style.background = colour((v - lo) / (hi - lo));
      c.title = `${L.label} head ${h}: ${fmt(v)}`; c.onclick = () => show(k, L.label, h, c);
    }
  }
}
function show(k, label, h, cell) {
  document.querySelectorAll('td.sel').forEach(e => e.classList.remove('sel')); cell.classList.add('sel');
  document.getElementById('title').textContent = `${label} head ${h}: items where it changed most`;
  const t = document.getElementById('items'); t.innerHTML = '<tr><th>item</th><th>image</th><th>prompt</th><th>mean JS</th><th>mask IoU FP/Q</th></tr>';
  for (const it of (D.top[k] || [])) {
    const r = t.insertRow(); const run = D.runs[it.item];
    r.insertCell().innerHTML = run ? `<a href="../${run}/">${it.item}</a>` : it.item;
    r.insertCell().textContent = it.image; r.insertCell().textContent = `${it.prompt} (${it.points})`;
    r.insertCell().textContent = fmt(it.js_mean); r.insertCell().textContent = fmt(it.iou);
  }
}
function table(id, rows, cols) {
  const t = document.getElementById(id); if (!rows.length) return;
  t.insertRow().innerHTML = cols.map(c => `<th>${c}</th>`).join('');
  for (const r of rows) { const tr = t.insertRow(); for (const c of cols) tr.insertCell().textContent = typeof r[c] === 'number' ? fmt(r[c]) : (r[c] ?? 'n/a'); }
}
table('layers', D.layer_rows, ['layer', 'n_items', 'js_mean', 'js_p95', 'spearman_js_iou_loss', 'attribution_delta_iou_mean']);
if (D.units.length) { document.getElementById('uhead').textContent = `Attribution (${D.units[0].mode})`;
  table('units', D.units, ['unit', 'kind', 'sites', 'n_items', 'delta_iou_mean', 'delta_iou_min', 'delta_iou_max', 'chosen_changed_rate']); }
sel.onchange = draw; draw();
</script></body></html>
"""
