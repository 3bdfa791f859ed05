"""Renderings of a LevelPlan: text table, Graphviz DOT, SVG and a self-contained HTML page."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from typing import TYPE_CHECKING

from torch.fx import Node

from fxfuse._errors import DumpError

from ._ops import module_of, tensor_shape

if TYPE_CHECKING:
    from ._partition import LevelPlan

__all__ = ["FORMATS", "alignment_html", "dump_text", "save", "to_dot", "to_html"]

FORMATS = (".txt", ".dot", ".svg", ".html")
_KIND_COLORS = {"affine": ("#dbe9fb", "#c4daf7"), "residual": ("#fde6cf", "#fbd6b0"), "general": ("#dcf2dc", "#c6e8c6")}
_HEADERS = ("index", "name", "kind", "width", "output shape", "params", "nodes")


def _rows(plan: LevelPlan) -> list[tuple[str, ...]]:
    return [
        (
            str(lv.index),
            lv.name,
            lv.kind,
            str(lv.width),
            str(lv.output_shape),
            str(plan.param_count(lv)),
            str(len(lv.nodes)),
        )
        for lv in plan
    ]


def dump_text(plan: LevelPlan) -> str:
    rows = [_HEADERS, *_rows(plan)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(_HEADERS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _op_label(plan: LevelPlan, n: Node) -> str:
    if n.op == "call_module":
        return type(module_of(plan.gm, n)).__name__
    if n.op == "placeholder":
        return "input"
    if n.op == "get_attr":
        return "param"
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _shape_label(n: Node) -> str:
    s = tensor_shape(n)
    return "×".join(str(d) for d in s) if s is not None else ""


def _level_of(n: Node) -> int | None:
    return n.meta.get("fxfuse", {}).get("level")


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(plan: LevelPlan) -> str:
    graph_nodes = list(plan.gm.graph.nodes)
    by_level: dict[int, list[Node]] = {}
    outside: list[Node] = []
    for n in graph_nodes:
        lv = _level_of(n)
        if lv is None:
            if n.op in ("placeholder", "output"):
                outside.append(n)
            continue
        by_level.setdefault(lv, []).append(n)

    def node_line(n: Node, indent: str) -> str:
        label = f"{n.name}\\n{_dot_escape(_op_label(plan, n))}"
        shape = _shape_label(n)
        if shape:
            label += f"\\n{shape}"
        style = ', shape=ellipse' if n.op in ("placeholder", "output") else ""
        style += ', style="filled,dashed", fillcolor="#f4f4f4"' if n.op == "get_attr" else ""
        return f'{indent}"{n.name}" [label="{label}"{style}];'

    lines = [
        f'digraph "{_dot_escape(type(plan.gm).__name__)}" {{',
        '  rankdir=TB; compound=true; newrank=true;',
        '  node [shape=box, style=filled, fillcolor=white, fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555", arrowsize=0.6];',
    ]
    lines += [node_line(n, "  ") for n in outside]
    for lv in plan:
        fill = _KIND_COLORS[lv.kind][lv.index % 2]
        title = f"L{lv.index}  {lv.name}  ({lv.kind}, width {lv.width})"
        lines.append(f"  subgraph cluster_L{lv.index} {{")
        lines.append(f'    label="{_dot_escape(title)}"; labeljust=l; style="filled,rounded"; fillcolor="{fill}";')
        lines += [node_line(n, "    ") for n in by_level.get(lv.index, [])]
        lines.append("  }")
    shown = {n for n in outside} | {n for ns in by_level.values() for n in ns}
    for n in graph_nodes:
        if n not in shown:
            continue
        for a in n.all_input_nodes:
            if a in shown:
                lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- HTML ------------------------------------------------------------------------------------

_BOX_W, _BOX_H, _GAP_X, _ROW_H, _BAND_PAD, _LEFT = 168, 30, 16, 44, 6, 230  # pads fit the row gap


def _html_layout(plan: LevelPlan) -> tuple[dict[Node, tuple[float, float]], list[Node], int, int]:
    """Rows level by level: each level gets its own block of rows, so bands never overlap.

    Within a level a node's row is its longest path from the level's first nodes,
    counted over all the level's nodes (drawn or not), with empty rows dropped.
    """
    nodes = list(plan.gm.graph.nodes)
    shown = [
        n
        for n in nodes
        if n.op in ("placeholder", "output")
        or (_level_of(n) is not None and n.meta["fxfuse"].get("input_dependent") and tensor_shape(n) is not None)
    ]
    local: dict[Node, int] = {}
    for n in nodes:
        lv = _level_of(n)
        if lv is None:
            continue
        ins = [local[a] for a in n.all_input_nodes if a in local and _level_of(a) == lv]
        local[n] = 1 + max(ins) if ins else 0
    rows: dict[int, list[Node]] = {0: [n for n in shown if n.op == "placeholder"]}
    next_row = 1
    for lv in plan:
        members = [n for n in shown if _level_of(n) == lv.index]
        used = sorted({local[n] for n in members})
        remap = {d: next_row + i for i, d in enumerate(used)}
        for n in members:
            rows.setdefault(remap[local[n]], []).append(n)
        next_row += len(used)
    rows[next_row] = [n for n in shown if n.op == "output"]
    max_cols = max(len(r) for r in rows.values())
    width = _LEFT + max_cols * (_BOX_W + _GAP_X) + 40
    pos: dict[Node, tuple[float, float]] = {}
    for d, row in rows.items():
        row_w = len(row) * (_BOX_W + _GAP_X) - _GAP_X
        x0 = _LEFT + (max_cols * (_BOX_W + _GAP_X) - _GAP_X - row_w) / 2
        for i, n in enumerate(row):
            pos[n] = (x0 + i * (_BOX_W + _GAP_X), 20 + d * _ROW_H)
    height = 20 + (next_row + 1) * _ROW_H + 20
    return pos, [n for n in shown if n in pos], width, height


def _svg(plan: LevelPlan, fills: dict[int, str] | None = None, notes: dict[int, str] | None = None) -> str:
    """The partitioned graph as SVG; ``fills`` and ``notes`` colour and annotate level bands by index."""
    pos, shown, width, height = _html_layout(plan)
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">'
    ]
    # level bands
    for lv in plan:
        ys = [pos[n][1] for n in shown if _level_of(n) == lv.index]
        if not ys:
            continue
        y0, y1 = min(ys) - _BAND_PAD, max(ys) + _BOX_H + _BAND_PAD
        fill = (fills or {}).get(lv.index) or _KIND_COLORS[lv.kind][lv.index % 2]
        note = (notes or {}).get(lv.index)
        extra = f" · {e(note)}" if note else ""
        parts.append(
            f'<g id="L{lv.index}" class="band"><rect x="4" y="{y0}" width="{width - 8}" height="{y1 - y0}" rx="6" '
            f'fill="{fill}" stroke="#9aa" stroke-width="0.6"/>'
            f'<text x="12" y="{y0 + 16}" font-weight="bold">L{lv.index} {e(lv.name)}</text>'
            f'<text x="12" y="{y0 + 30}" fill="#444">{lv.kind} · width {lv.width}{extra}</text></g>'
        )
    # edges
    shown_set = set(shown)
    for n in shown:
        for a in n.all_input_nodes:
            if a not in shown_set:
                continue
            x1, y1 = pos[a][0] + _BOX_W / 2, pos[a][1] + _BOX_H
            x2, y2 = pos[n][0] + _BOX_W / 2, pos[n][1]
            if y2 - y1 > _ROW_H:  # skip connection: leave and enter on the left, bowed around the boxes
                xa, ya = pos[a][0], pos[a][1] + _BOX_H / 2
                xb, yb = pos[n][0], pos[n][1] + _BOX_H / 2
                cx = min(xa, xb) - 28 - min(60.0, 0.04 * (yb - ya))
                d = f"M{xa},{ya} C{cx},{ya} {cx},{yb} {xb},{yb}"
            else:
                d = f"M{x1},{y1} L{x2},{y2}"
            parts.append(f'<path d="{d}" fill="none" stroke="#667" stroke-width="1" marker-end="url(#arrow)"/>')
    parts.insert(
        1,
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>',
    )
    # nodes
    for n in shown:
        x, y = pos[n]
        op = _op_label(plan, n)
        shape = _shape_label(n)
        meta = n.meta.get("fxfuse", {})
        tip = f"{n.name}\nop: {n.op}\ntarget: {n.target}\nshape: {shape}\nneuron axis: {meta.get('neuron_axis')}"
        rx = 14 if n.op in ("placeholder", "output") else 3
        parts.append(
            f'<g class="node"><title>{e(tip)}</title>'
            f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="{rx}" fill="white" stroke="#456"/>'
            f'<text x="{x + 6}" y="{y + 12}">{e(_clip(op, 26))}</text>'
            f'<text x="{x + 6}" y="{y + 25}" fill="#666">{e(_clip(shape, 28))}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def to_html(plan: LevelPlan) -> str:
    e = html.escape
    name = type(plan.gm).__name__
    total = sum(p.numel() for p in plan.gm.parameters())
    kinds = {k: sum(1 for lv in plan if lv.kind == k) for k in _KIND_COLORS}
    rows = []
    for lv, r in zip(plan, _rows(plan)):
        cells = [f"<td>{e(c)}</td>" for c in r]
        cells[1] = f'<td><a href="#L{lv.index}">{e(lv.name)}</a></td>'
        rows.append(
            f'<tr style="background:{_KIND_COLORS[lv.kind][0]}" title="output node: {e(lv.output)}">'
            f'{"".join(cells)}</tr>'
        )
    legend = " ".join(
        f'<span class="chip" style="background:{c[0]}">{k}: {kinds[k]}</span>' for k, c in _KIND_COLORS.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fxfuse levels: {e(name)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 24px; }}
th, td {{ border: 1px solid #bbb; padding: 3px 8px; text-align: left; }}
th {{ background: #eee; }}
.chip {{ display: inline-block; padding: 2px 8px; border-radius: 8px; margin-right: 6px; font-size: 13px; }}
.graph {{ overflow: auto; border: 1px solid #ccc; }}
.node:hover rect {{ stroke: #c00; stroke-width: 2; }}
</style></head>
<body>
<h1>fxfuse level plan: {e(name)}</h1>
<p>{len(plan)} levels · {sum(len(lv.nodes) for lv in plan)} nodes · {total:,} parameters · {legend}</p>
<table>
<thead><tr>{"".join(f"<th>{h}</th>" for h in _HEADERS)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<h2>Partitioned graph</h2>
<p>Each band is one level; hover a node for its name, target, shape and neuron axis.
Parameters, constants and shape queries are omitted from the drawing.</p>
<div class="graph">
{_svg(plan)}
</div>
</body></html>
"""


def save(plan: LevelPlan, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot save a level plan as {ext or 'a file without suffix'!r} ({path}); use one of {', '.join(FORMATS)}")
    if ext == ".txt":
        text = plan.dump() + "\n"
    elif ext == ".dot":
        text = plan.to_dot()
    elif ext == ".html":
        text = plan.to_html()
    else:
        text = _render_svg(plan.to_dot(), path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _render_svg(dot_source: str, path: str) -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise DumpError(
            f"cannot write {path}: SVG output needs Graphviz's `dot` program, which is not installed. "
            "Install it (Debian/Ubuntu: `apt-get install graphviz`; macOS: `brew install graphviz`; "
            "conda: `conda install graphviz`), or save as .html (no Graphviz needed) or .dot."
        )
    proc = subprocess.run([exe, "-Tsvg"], input=dot_source, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DumpError(f"Graphviz `dot` failed writing {path} (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _cost_color(c: float) -> str:
    """Green (1 − CKA near 0: similar) to red (near 1: unrelated)."""
    c = min(max(c, 0.0), 1.0)
    r, g = int(90 + 165 * c), int(200 - 120 * c)
    return f"rgb({r},{g},110)"


def _cost_svg(cost, mapping: tuple[int, ...], rows: list[str], cols: list[str], pinned: set[int]) -> str:
    """A heat map of 1 − CKA (rows: a model's levels, columns: the target's), the chosen matches outlined."""
    e = html.escape
    cell, left, top = 22, 150, 95
    n, m = cost.shape
    w, h = left + m * cell + 10, top + n * cell + 10
    parts = [f'<svg class="heat" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="Helvetica, Arial, sans-serif" font-size="10">']
    for i, name in enumerate(cols):
        x = left + i * cell + cell / 2
        weight = ' font-weight="bold"' if i in pinned else ""
        parts.append(f'<text transform="translate({x + 3},{top - 6}) rotate(-60)"{weight}>{e(_clip(f"{i} {name}", 22))}</text>')
    for j, name in enumerate(rows):
        y = top + j * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell / 2 + 3}" text-anchor="end">{e(_clip(f"{j} {name}", 22))}</text>')
        for i in range(m):
            c = float(cost[j, i])
            parts.append(f'<rect x="{left + i * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="{_cost_color(c)}"><title>{e(rows[j])} vs {e(cols[i])}: 1 − CKA {c:.3f}</title></rect>')
        i = mapping[j]
        parts.append(f'<rect class="match" x="{left + i * cell + 1}" y="{y + 1}" width="{cell - 3}" height="{cell - 3}" '
                     'fill="none" stroke="#111" stroke-width="2.5"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def alignment_html(alignment, plans, names) -> str:
    """A self-contained page showing a :class:`~fxfuse.passes.DepthAlignment`: one row per level of the target
    with the matched level of every model (or the identity inserted there), and a heat map of 1 − linear CKA
    per model with the chosen matches outlined."""
    e = html.escape
    t = alignment.target
    tp = plans[t]
    inverse = [{ti: j for j, ti in enumerate(mp)} for mp in alignment.mapping]
    head = "".join(f"<th>{e(n)}</th>" for n in ["level", f"{names[t]} (target)"] +
                   [n for k, n in enumerate(names) if k != t] + ["pinned"])
    body = []
    for i in range(len(tp)):
        cells = [f"<td>{i}</td>", f"<td>{e(tp[i].name)}</td>"]
        for k in range(len(plans)):
            if k == t:
                continue
            j = inverse[k].get(i)
            if j is None:
                cells.append('<td class="ident">+ identity</td>')
            else:
                c = float(alignment.costs[k][j, i])
                cells.append(f'<td style="background:{_cost_color(c)}33">{j} {e(plans[k][j].name)} '
                             f'<small>(1 − CKA {c:.2f})</small></td>')
        cells.append(f"<td>{'pin' if i in alignment.pinned else ''}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    maps = []
    for k in range(len(plans)):
        if k == t:
            continue
        maps.append(f"<h2>{e(names[k])} against {e(names[t])}</h2>" + _cost_svg(
            alignment.costs[k], alignment.mapping[k], [lv.name for lv in plans[k]], [lv.name for lv in tp],
            set(alignment.pinned)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fxfuse depth alignment</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 24px; }}
th, td {{ border: 1px solid #bbb; padding: 3px 8px; text-align: left; }}
th {{ background: #eee; }}
td.ident {{ background: #f3e8ff; font-style: italic; }}
</style></head>
<body>
<h1>Depth alignment (cross-layer alignment)</h1>
<p>Every model is aligned to {e(names[t])} ({len(tp)} levels). Pinned levels (first, head, and those that change
the shape) match in order; between them a dynamic program picks the matches with the least 1 − linear CKA of the
level outputs (CLAFusion, Algorithm 1). Levels a model lacks get an identity level.</p>
<table id="alignment"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<p>Heat maps: 1 − CKA from green (similar) to red (unrelated); outlined cells are the chosen matches; bold
columns are pinned.</p>
{chr(10).join(maps)}
</body></html>
"""
