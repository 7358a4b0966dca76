"""The search as parallel coordinates: one self-contained HTML page (no network: the data and
the drawing code are inline), one line per trial across every searched axis and best val F1,
coloured by best val F1. MLflow's artifact view shows it in the run's Artifacts tab.

A categorical axis spaces its values evenly ("n/a" where a `when:` axis did not apply); a
numeric axis is linear, or logarithmic where the space is log-uniform. Hovering a line names
its trial and values; clicking an axis value (categorical) or dragging along an axis
(numeric) keeps only the trials that pass (click the axis name to clear)."""

from __future__ import annotations

import html
import json

import pandas as pd

from components.evaluation.search_plots import METRIC, _labels, _scored, _text


def _axis(key: str, values: pd.Series, kind: str) -> dict:
    numbers = pd.to_numeric(values, errors="coerce")
    if kind in ("grid", "choice") or numbers.notna().sum() == 0 or \
            (numbers.isna() & values.notna()).any():
        return {"key": key, "type": "cat", "values": _labels(values)}
    low, high = float(numbers.min()), float(numbers.max())
    log = kind == "loguniform" and low > 0
    return {"key": key, "type": "log" if log else "lin", "range": [low, high],
            "missing": bool(numbers.isna().any())}


def parallel_data(board: pd.DataFrame, axes) -> dict:
    """The page's data: axes (the searched ones that vary, then best val F1) and trials."""
    from components.evaluation.importance import searched_axes

    varied = searched_axes(board, axes)
    df = _scored(board, [a.key for a in axes])
    spec = [_axis(a.key, df[a.key], a.kind) for a in varied]
    f1 = df[METRIC].astype(float)
    spec.append({"key": METRIC, "type": "lin", "range": [float(f1.min()), float(f1.max())],
                 "missing": False})
    trials = []
    for _, row in df.iterrows():
        values = {}
        for a in spec:
            v = row[a["key"]]
            if a["type"] == "cat":
                values[a["key"]] = _text(pd.Series([v])).iloc[0]
            else:
                values[a["key"]] = None if pd.isna(v) else float(v)
        trials.append({"id": str(row.get("trial_id", "")), "values": values,
                       "f1": float(row[METRIC])})
    return {"axes": spec, "trials": trials}


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:12px;color:#222}
h3{margin:0 0 4px} p{margin:2px 0 8px;color:#555}
path.trial{fill:none;stroke-width:1.8;opacity:.8} path.trial:hover{stroke-width:4;opacity:1}
path.trial.off{stroke:#ccc!important;opacity:.25}
.axis line{stroke:#444} .axis text{font-size:11px} .axis .name{font-weight:600;cursor:pointer}
.axis .tick{cursor:pointer} .brush{fill:#4c72b0;opacity:.15}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:4px 6px;
font-size:12px;display:none;white-space:pre}
</style></head><body>
<h3>__TITLE__</h3>
<p>__SUBTITLE__</p>
<svg id="pc" xmlns="http://www.w3.org/2000/svg"></svg><div id="tip"></div>
<script>
const DATA = __DATA__;
// The longest tick label of the first axis sets the left margin (about 7 px a character);
// the drawing scales to the frame it is shown in (MLflow's preview is narrower than a page).
const longest = Math.max(4, ...DATA.axes[0].type === "cat"
  ? DATA.axes[0].values.map(v => String(v).length) : [6]);
const LEFT = 16 + 7 * longest, W = LEFT + 150 * Math.max(1, DATA.axes.length - 1) + 40;
const H = 420, TOP = 40, BOTTOM = 40;
const svg = document.getElementById("pc"), tip = document.getElementById("tip");
svg.setAttribute("viewBox", "0 0 " + W + " " + H); svg.setAttribute("width", "100%");
svg.style.maxWidth = W + "px";
const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, parent, text) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  (parent || svg).appendChild(e); return e;
}
const VIRIDIS = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
function colour(t) {
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return "rgb(" + c.join(",") + ")";
}
const x = i => LEFT + i * (W - LEFT - 40) / Math.max(1, DATA.axes.length - 1);
function y(axis, v) {   // pixel of a value; "n/a" and missing numbers sit below the axis
  const lo = TOP, hi = H - BOTTOM;
  if (axis.type === "cat") {
    const i = axis.values.indexOf(v), n = axis.values.length;
    return n === 1 ? (lo + hi) / 2 : hi - i * (hi - lo) / (n - 1);
  }
  if (v === null) return hi + 22;
  let [a, b] = axis.range, t;
  if (axis.type === "log") { a = Math.log(a); b = Math.log(b); v = Math.log(v); }
  t = b > a ? (v - a) / (b - a) : 0.5;
  return hi - t * (hi - lo);
}
const f1 = DATA.axes[DATA.axes.length - 1].range;
const keep = {};   // axis key -> test of a value
function fmt(v) { return typeof v === "number" ? Number(v.toPrecision(3)).toString() : v; }
const lines = DATA.trials.map(t => {
  const d = DATA.axes.map((a, i) => (i ? "L" : "M") + x(i) + "," + y(a, t.values[a.key])).join("");
  const p = el("path", {d: d, class: "trial",
                        stroke: colour(f1[1] > f1[0] ? (t.f1 - f1[0]) / (f1[1] - f1[0]) : 1)});
  p.addEventListener("mousemove", e => {
    tip.style.display = "block"; tip.style.left = e.clientX + 12 + "px";
    tip.style.top = e.clientY + 12 + "px";
    const shown = a => fmt(t.values[a.key] === null ? "n/a" : t.values[a.key]);
    tip.textContent = "trial " + t.id + "\\n" +
      DATA.axes.map(a => a.key + " = " + shown(a)).join("\\n");
  });
  p.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  return [t, p];
});
function refresh() {
  for (const [t, p] of lines)
    p.classList.toggle("off", !Object.entries(keep).every(([k, ok]) => ok(t.values[k])));
}
DATA.axes.forEach((a, i) => {
  const g = el("g", {class: "axis"});
  el("line", {x1: x(i), x2: x(i), y1: TOP, y2: H - BOTTOM}, g);
  el("text", {x: x(i), y: TOP - 14, "text-anchor": "middle", class: "name"}, g, a.key)
    .addEventListener("click", () => {
      delete keep[a.key]; g.querySelectorAll(".brush").forEach(b => b.remove()); refresh();
    });
  const [lo, hi] = a.type === "log" ? a.range.map(Math.log) : (a.range || [0, 0]);
  const at = t => a.type === "log" ? Math.exp(lo + t * (hi - lo)) : lo + t * (hi - lo);
  const ticks = a.type === "cat" ? a.values : [0, 0.25, 0.5, 0.75, 1].map(at);
  for (const v of ticks) {
    const t = el("text", {x: x(i) - 6, y: y(a, v) + 4, "text-anchor": "end", class: "tick"},
                 g, fmt(v));
    if (a.type === "cat")
      t.addEventListener("click", () => { keep[a.key] = w => w === v; refresh(); });
  }
  if (a.type !== "cat") {   // drag along a numeric axis to keep a range
    const hit = el("rect", {x: x(i) - 8, y: TOP, width: 16, height: H - BOTTOM - TOP,
                            fill: "transparent"}, g);
    hit.addEventListener("mousedown", e => {
      // screen pixels to the drawing's own units: the page scales to its frame
      const box = svg.getBoundingClientRect(), at = c => (c - box.top) * H / box.height;
      const y0 = at(e.clientY);
      g.querySelectorAll(".brush").forEach(b => b.remove());
      const b = el("rect", {x: x(i) - 8, y: y0, width: 16, height: 1, class: "brush"}, g);
      const move = m => { const y1 = at(m.clientY);
        b.setAttribute("y", Math.min(y0, y1)); b.setAttribute("height", Math.abs(y1 - y0));
        const [lo, hi] = [Math.min(y0, y1), Math.max(y0, y1)];
        keep[a.key] = v => v !== null && y(a, v) >= lo && y(a, v) <= hi; refresh(); };
      const up = () => {
        window.removeEventListener("mousemove", move); window.removeEventListener("mouseup", up);
      };
      window.addEventListener("mousemove", move); window.addEventListener("mouseup", up);
    });
  }
});
</script></body></html>
"""


def parallel_coordinates_html(board: pd.DataFrame, axes) -> str | None:
    """The page for the leaderboard's scored trials over the searched `axes` (objects with
    .key and .kind); None when no trial has a score."""
    data = parallel_data(board, axes)
    if not data["trials"]:
        return None
    n_axes = len(data["axes"]) - 1
    title = f"{len(data['trials'])} trials over {n_axes} searched axes and best val F1"
    subtitle = ("One line per trial, coloured by best val F1 (yellow best). Hover a line for "
                "its trial; click a value or drag along a numeric axis to keep those trials; "
                "click an axis name to clear it.")
    # JSON inside <script>: no "<" at all, so neither "</script>" nor "<!--" can end or
    # change the script (JSON reads "\\u003c" as "<")
    payload = json.dumps(data, allow_nan=False, default=lambda v: None).replace("<", "\\u003c")
    # placeholders, not %-formatting: the page's CSS and script hold "%" of their own
    return (_PAGE.replace("__TITLE__", html.escape(title))
            .replace("__SUBTITLE__", html.escape(subtitle)).replace("__DATA__", payload))
