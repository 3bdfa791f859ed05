"""The fusion report (HTML and JSON) and the model card, rendered from a run's records.

The HTML page is one self-contained file: inline CSS, inline SVG and a short
inline script, nothing fetched from the network.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
from typing import Any

__all__ = ["REPORT_FORMAT", "report_dict", "report_html", "model_card", "write_reports", "SOLVED_MARKS"]

REPORT_FORMAT = "fxfuse-report/1"

# how a level was solved → (colour, mark shape)
SOLVED_MARKS = {
    "closed form": ("#1b7837", "circle"),
    "gradient": ("#c2185b", "square"),
    "identity": ("#555555", "diamond"),
}
_OTHER_MARK = ("#e08214", "triangle")


def _versions() -> dict[str, str]:
    import timm
    import torch

    from fxfuse import __version__

    return {"fxfuse": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def report_dict(rec) -> dict[str, Any]:
    """The JSON report: ``levels`` is a list of ``{name, error, seconds, solved_by, …}``, ``results`` a list of
    ``{model, accuracy, loss, …}``."""
    r = rec.recipe
    return {
        "format": REPORT_FORMAT,
        "run": {
            "recipe": r.text,
            "versions": _versions(),
            "seed": r.seed,
            "device": rec.device,
            "method": r.method.name,
            "options": r.method.options,
            "importance": r.importance,
            "stages": rec.stages,
            "seconds": rec.seconds,
            "peak_rss_mb": rec.peak_rss_mb,
            "peak_cuda_mb": rec.peak_cuda_mb,
        },
        "data": rec.data,
        "models": rec.models,
        "results": rec.results,
        "levels": rec.levels,
        "neuron_spaces": rec.spaces,
        "outputs": rec.outputs,
        "notes": rec.notes,
    }


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def _mark(shape: str, x: float, y: float, r: float, colour: str) -> str:
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}"/>'
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{colour}"/>'
    if shape == "diamond":
        return f'<path d="M{x:.1f},{y - r - 1:.1f} L{x + r + 1:.1f},{y:.1f} L{x:.1f},{y + r + 1:.1f} ' \
               f'L{x - r - 1:.1f},{y:.1f} z" fill="{colour}"/>'
    return f'<path d="M{x:.1f},{y - r - 1:.1f} L{x + r + 1:.1f},{y + r:.1f} L{x - r - 1:.1f},{y + r:.1f} z" ' \
           f'fill="{colour}"/>'


def _log_err(e: float | None) -> float | None:
    if e is None or not math.isfinite(e):
        return None
    return math.log10(max(e, 1e-12))


def level_plot(levels: list[dict[str, Any]]) -> str:
    """SVG: relative approximation error per level (log scale, one mark per level, shaped by how it was solved)
    above the seconds per level (bars)."""
    e = html.escape
    n = len(levels)
    step = max(14.0, min(40.0, 860.0 / max(n, 1)))
    left, top, ph, gap, sh = 64, 24, 200, 46, 90
    width = int(left + step * n + 30)
    height = top + ph + gap + sh + 40
    logs = [_log_err(lv["error"]) for lv in levels]
    finite = [v for v in logs if v is not None] or [0.0]
    hi = math.ceil(max(finite))
    lo = max(math.floor(min(finite)), hi - 6)  # six decades; smaller errors sit on the bottom line
    if hi == lo:
        hi = lo + 1
    clipped = any(v < lo for v in finite)

    def ymap(v: float) -> float:
        return top + ph - (v - lo) / (hi - lo) * ph

    secs = [lv["seconds"] or 0.0 for lv in levels]
    smax = max(secs + [1e-9])
    parts = [f'<svg id="level-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">']
    parts.append(f'<text x="{left}" y="14" font-weight="bold">relative approximation error (log scale)</text>')
    for d in range(lo, hi + 1):
        y = ymap(d)
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">'
                     f'{"≤" if d == lo and clipped else ""}1e{d}</text>')
    sy0 = top + ph + gap
    parts.append(f'<text x="{left}" y="{sy0 - 10}" font-weight="bold">seconds per level (max {smax:.2f} s)</text>')
    parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{sy0 + sh}" y2="{sy0 + sh}" stroke="#999"/>')
    for i, lv in enumerate(levels):
        x = left + step * (i + 0.5)
        colour, shape = SOLVED_MARKS.get(lv["solved_by"], _OTHER_MARK)
        tip = (f"level {lv['index']} {lv['name']} ({lv['kind']})\nsolved by: {lv['approximation']}\n"
               f"grouping: {lv['grouping']}\nrelative error: {lv['error']:.3g}\nseconds: {lv['seconds']:.2f}")
        v = logs[i]
        y = ymap(max(v, lo)) if v is not None else top
        parts.append(f'<g class="level-mark" data-level="{lv["index"]}" data-solved="{e(lv["solved_by"])}">'
                     f'<title>{e(tip)}</title>{_mark(shape, x, y, 5, colour)}</g>')
        bh = (secs[i] / smax) * sh
        parts.append(f'<rect class="level-bar" data-level="{lv["index"]}" x="{x - step * 0.35:.1f}" '
                     f'y="{sy0 + sh - bh:.1f}" width="{step * 0.7:.1f}" height="{bh:.1f}" fill="#7b9fc7">'
                     f'<title>{e(lv["name"])}: {lv["seconds"]:.2f} s</title></rect>')
        if n <= 40 or i % max(1, n // 40) == 0:
            parts.append(f'<text x="{x:.1f}" y="{sy0 + sh + 14}" text-anchor="middle" fill="#555">{lv["index"]}</text>')
    parts.append(f'<text x="{left + (width - left) / 2:.0f}" y="{height - 6}" text-anchor="middle" fill="#333">'
                 'level</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _held(r: dict, shown: bool) -> str:
    """The held-out error cell (option ``held_out``), or nothing when no level has one."""
    if not shown:
        return ""
    v = r.get("held_out_error")
    return f"<td class='num'>{'—' if v is None else format(v, '.3g')}</td>"


def _error_colour(v: float | None, lo: float, hi: float) -> str:
    """Green (small error) to red (large), on the log scale of the run's own errors."""
    if v is None:
        return "#eeeeee"
    t = 0.0 if hi == lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
    r = int(120 + 135 * t)
    g = int(220 - 120 * t)
    b = int(140 - 40 * t)
    return f"#{r:02x}{g:02x}{b:02x}"


def _plan_svg(rec) -> str:
    if rec.fused_plan is None:
        return "<p>(no level plan: see the notes)</p>"
    from fxfuse.passes._render import _svg

    logs = {lv["index"]: _log_err(lv["error"]) for lv in rec.levels}
    finite = [v for v in logs.values() if v is not None] or [0.0]
    hi = max(finite)
    lo = max(min(finite), hi - 3)  # three decades of colour: an exact level must not wash out the rest
    fills = {i: _error_colour(v, lo, hi) for i, v in logs.items()}
    notes = {lv["index"]: f"err {lv['error']:.1e} · {lv['solved_by']}" for lv in rec.levels}
    return _svg(rec.fused_plan, fills=fills, notes=notes)


_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 20px; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eee; }
tr.fused td { font-weight: bold; background: #eef6ee; }
tr.hl td { background: #fff3c4; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 8px; overflow: auto; font-size: 12px; }
.graph { overflow: auto; border: 1px solid #ccc; max-height: 900px; }
.legend span { display: inline-block; margin-right: 14px; font-size: 13px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
.level-mark:hover { opacity: 0.6; }
.note { color: #8a4b00; }
#js-errors { color: #b00; }
"""

_SCRIPT = """
(function () {
  var errs = [];
  window.addEventListener('error', function (ev) {
    errs.push(String(ev.message));
    var box = document.getElementById('js-errors');
    if (box) { box.textContent = 'script errors: ' + errs.join('; '); }
  });
  document.addEventListener('DOMContentLoaded', function () {
    var rows = document.querySelectorAll('tr[data-level]');
    var marks = document.querySelectorAll('.level-mark');
    function light(level, on) {
      rows.forEach(function (r) { if (r.dataset.level === level) { r.classList.toggle('hl', on); } });
    }
    marks.forEach(function (m) {
      m.addEventListener('mouseenter', function () { light(m.dataset.level, true); });
      m.addEventListener('mouseleave', function () { light(m.dataset.level, false); });
    });
    var count = document.getElementById('mark-count');
    if (count) { count.textContent = String(marks.length); }
    document.body.setAttribute('data-ready', errs.length ? 'errors' : '1');
  });
})();
"""


def report_html(rec) -> str:
    """The self-contained HTML report of a run."""
    e = html.escape
    d = report_dict(rec)
    r = rec.recipe
    run = d["run"]
    arch = rec.models[0]["arch"] if rec.models else "?"
    res_rows = []
    for x in rec.results:
        cls = ' class="fused"' if x["kind"] == "fused" else ""
        res_rows.append(
            f"<tr{cls}><td>{e(x['model'])}</td><td>{x['kind']}</td><td class='num'>{_fmt(x['accuracy'])}</td>"
            f"<td class='num'>{_fmt(x['loss'], '.3f')}</td><td class='num'>{_fmt(x['seconds'], '.1f')}</td>"
            f"<td class='num'>{x['parameters']:,}</td></tr>"
        )
    has_eval = any(x["accuracy"] is not None for x in rec.results)
    models_rows = "".join(
        f"<tr><td>{i}</td><td>{e(m['name'])}</td><td>{e(str(m['model']))}</td><td>{e(str(m['checkpoint'] or ''))}</td>"
        f"<td class='num'>{m['parameters']:,}</td><td class='num'>{_fmt(m.get('accuracy'))}</td></tr>"
        for i, m in enumerate(rec.models)
    )
    # option held_out: errors on the samples no fit saw, next to those on the fitted ones
    held = any(lv.get("held_out_error") is not None for lv in rec.levels)
    held_th = "<th>held-out error</th>" if held else ""
    lv_rows = "".join(
        f"<tr data-level='{lv['index']}'><td>{lv['index']}</td><td>{e(lv['name'])}</td><td>{lv['kind']}</td>"
        f"<td>{e(lv['grouping'])}</td><td>{e(lv['approximation'])}"
        f"{'<br><small>identity level in ' + e(', '.join(lv['identity'])) + '</small>' if lv.get('identity') else ''}"
        f"</td><td class='num'>{lv['error']:.3g}</td>{_held(lv, held)}"
        f"<td class='num'>{'' if lv['ridge'] is None else format(lv['ridge'], '.0e')}</td>"
        f"<td class='num'>{lv['rows']}×{lv['columns']}</td><td class='num'>{lv['seconds']:.2f}</td></tr>"
        for lv in rec.levels
    )
    op_rows = "".join(
        f"<tr data-level='{lv['index']}'><td>{lv['index']}</td><td>{e(op['op'])}</td><td>{e(op['role'])}</td>"
        f"<td>{e(op['grouping'])}</td><td class='num'>{op['error']:.3g}</td>{_held(op, held)}"
        f"<td class='num'>{'' if op['ridge'] is None else format(op['ridge'], '.0e')}</td>"
        f"<td class='num'>{op['rows']}×{op['columns']}</td></tr>"
        for lv in rec.levels for op in lv.get("ops", [])
    )
    ops_html = "" if not op_rows else (
        "<h3>Ops of block levels</h3><p>Levels solved op by op in closed form: each inner op against its own "
        "grouped targets, then the ops of the sum jointly (role <i>sum</i>).</p><table><thead><tr><th>level</th>"
        f"<th>op</th><th>role</th><th>grouping</th><th>rel. error</th>{held_th}<th>ridge</th><th>rows × columns</th></tr>"
        f"</thead><tbody>{op_rows}</tbody></table>"
    )
    counts: dict[str, int] = {}
    for lv in rec.levels:
        counts[lv["solved_by"]] = counts.get(lv["solved_by"], 0) + 1
    legend = "".join(
        f'<span><svg width="12" height="12">{_mark(SOLVED_MARKS.get(k, _OTHER_MARK)[1], 6, 6, 4, SOLVED_MARKS.get(k, _OTHER_MARK)[0])}'
        f"</svg> {e(k)}: {v}</span>" for k, v in counts.items()
    )
    n_free = sum(1 for s in rec.spaces if not s["fixed"])
    n_grouped = sum(1 for s in rec.spaces if s["how"].startswith("grouped"))
    n_inside = sum(1 for s in rec.spaces if s["how"].startswith("inside"))
    sp_rows = "".join(
        f"<tr><td>{s['index']}</td><td class='num'>{s['size']}</td><td>{'fixed' if s['fixed'] else 'free'}</td>"
        f"<td>{e(s['how'])}</td><td class='num'>{s['tensors']}</td></tr>" for s in rec.spaces
    )
    stage_rows = "".join(f"<tr><td>{e(s['stage'])}</td><td class='num'>{s['seconds']:.2f}</td></tr>"
                         for s in rec.stages)
    out_rows = "".join(f"<tr><td>{e(o['file'])}</td><td>{e(o['what'])}</td><td>{e(o['check'])}</td></tr>"
                       for o in rec.outputs)
    notes = "".join(f"<li class='note'>{e(n)}</li>" for n in rec.notes)
    vers = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    mem = f"{run['peak_rss_mb']:.0f} MB peak resident memory" + (
        f", {run['peak_cuda_mb']:.0f} MB peak CUDA memory" if run["peak_cuda_mb"] is not None else "")
    pre = "\n".join(f"{k}: {v}" for k, v in (rec.data.get("preprocessing") or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fxfuse report: {e(r.method.name)} of {len(rec.models)} × {e(arch)}</title>
<style>{_CSS}</style>
<script>{_SCRIPT}</script>
</head>
<body>
<h1>fxfuse fusion report</h1>
<p><b>{e(r.method.name)}</b> of {len(rec.models)} × <b>{e(arch)}</b>, {len(rec.levels)} levels,
seed {r.seed}, device {e(rec.device)}, {run['seconds']:.1f} s in all, {mem}.</p>
<p id="js-errors"></p>
{f"<ul>{notes}</ul>" if notes else ""}
<h2>Results</h2>
{"" if has_eval else "<p>No <code>data.eval</code> in the recipe: nothing was evaluated.</p>"}
<table><thead><tr><th>model</th><th>kind</th><th>accuracy %</th><th>loss</th><th>seconds</th><th>parameters</th></tr></thead>
<tbody>{"".join(res_rows)}</tbody></table>
<h2>Levels</h2>
<p>One mark per level (<span id="mark-count">{len(rec.levels)}</span>): the relative approximation error of the
fused level against its grouped targets, ‖fused − target‖² / ‖target‖², on the fusion samples; the shape says how
the level was solved. Hover a mark for details.</p>
<p class="legend">{legend}</p>
<div class="graph">{level_plot(rec.levels)}</div>
<table><thead><tr><th>level</th><th>name</th><th>kind</th><th>grouping</th><th>solved by</th><th>rel. error</th>
{held_th}<th>ridge</th><th>rows × columns</th><th>s</th></tr></thead><tbody>{lv_rows}</tbody></table>
{ops_html}
<h2>Level plan</h2>
<p>The fused model's graph cut into levels; each band is coloured by its error on a log scale from the
largest error (red) down three decades (green).</p>
<div class="graph">{_plan_svg(rec)}</div>
<h2>Neuron spaces</h2>
<p>{len(rec.spaces)} neuron spaces ({n_free} free, {len(rec.spaces) - n_free} fixed): {n_grouped} grouped at a
level's output, {n_inside} inside a level (solved with it).</p>
<details><summary>all spaces</summary>
<table><thead><tr><th>space</th><th>size</th><th></th><th>coverage</th><th>tensors</th></tr></thead>
<tbody>{sp_rows}</tbody></table></details>
<h2>Models</h2>
<table><thead><tr><th>#</th><th>name</th><th>model</th><th>checkpoint</th><th>parameters</th><th>accuracy %</th></tr></thead>
<tbody>{models_rows}</tbody></table>
<h2>Data</h2>
<p>Fusion: {e(str(rec.data.get('fusion', '')))}<br>Evaluation: {e(str(rec.data.get('eval', '(none)')))}</p>
<pre>{e(pre)}</pre>
<h2>Run</h2>
<p>{e(vers)}</p>
<table><thead><tr><th>stage</th><th>seconds</th></tr></thead><tbody>{stage_rows}</tbody></table>
<h3>Recipe</h3>
<pre>{e(r.text)}</pre>
<h2>Output files</h2>
<table><thead><tr><th>file</th><th>what</th><th>check</th></tr></thead><tbody>{out_rows}</tbody></table>
</body></html>
"""


def model_card(rec) -> str:
    """``README.md`` of the model directory: YAML front matter, the results, how to load it."""
    import yaml

    r = rec.recipe
    arch = rec.models[0]["arch"]
    front = {
        "library_name": "timm",
        "tags": ["image-classification", "timm", "fxfuse", "model-fusion"],
        "base_model": [m["name"] for m in rec.models],
        "fxfuse": {"method": r.method.name, "options": r.method.options, "importance": r.importance,
                   "seed": r.seed, "recipe": "recipe.yaml"},
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {arch} fused from {len(rec.models)} models with fxfuse ({r.method.name})", "",
             f"Made by `fxfuse run recipe.yaml` (fxfuse {_versions()['fxfuse']}). Fusion data: "
             f"{rec.data.get('fusion', '')}.", ""]
    if any(x["accuracy"] is not None for x in rec.results):
        lines += [f"Evaluated on {rec.data.get('eval')}:", "", "| model | accuracy % | loss |", "|---|---:|---:|"]
        lines += [f"| {x['model']} | {_fmt(x['accuracy'])} | {_fmt(x['loss'], '.3f')} |" for x in rec.results]
        lines.append("")
    files = {o["file"] for o in rec.outputs}
    lines += ["## Load it", ""]
    if "model.safetensors" in files:
        lines += ["```python", "import timm", "model = timm.create_model(\"local-dir:PATH/TO/THIS/FOLDER\", "
                  "pretrained=True)", "```", ""]
    if "model.torchscript.pt" in files:
        lines += ["```python", "import torch", "model = torch.jit.load(\"model.torchscript.pt\")", "```", ""]
    if "model.pt2" in files:
        lines += ["```python", "import torch", "model = torch.export.load(\"model.pt2\").module()", "```", ""]
    lines += ["## Files", ""] + [f"- `{o['file']}`: {o['what']}" + (f" ({o['check']})" if o["check"] else "")
                                 for o in rec.outputs]
    if rec.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rec.notes]
    return "\n".join(lines) + "\n"


def write_reports(rec, folder: str) -> None:
    """Write the model card and the report files of ``rec.recipe.report`` into ``folder``."""
    r = rec.recipe.report
    if r.json:
        rec.outputs.append({"file": r.json, "what": "the report's data (JSON)", "check": "", "ok": True})
    if r.html:
        rec.outputs.append({"file": r.html, "what": "the fusion report (per-level errors, level plan; HTML)", "check": "",
                            "ok": True})
    rec.outputs.append({"file": "README.md", "what": "model card", "check": "", "ok": True})
    for name, text in ((r.json, lambda: json.dumps(report_dict(rec), indent=2, default=str)),
                       (r.html, lambda: report_html(rec)), ("README.md", lambda: model_card(rec))):
        if name:
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path) or folder, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text())
