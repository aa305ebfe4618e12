"""A static HTML tree of latents across SAEs of growing size (or one Matryoshka SAE's nested prefixes).

Each level is an SAE, or a range of one SAE's latents (:func:`prefix_levels` cuts a Matryoshka
SAE into its nested groups). A latent of one level is the child of the latent of the previous
level it co-fires with most: the parent with the highest ``P(parent fires | child fires)`` on the
given activations (ties broken by decoder cosine). Each node shows how often the latent fires and
its top-activating text snippets; each edge shows ``P(parent | child)`` and the decoder cosine.

:func:`write_tree_view` writes one self-contained ``.html`` file (inline CSS and a few lines of
inline JavaScript for expand/collapse; no network, no server), atomically.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from .analysis import checked_encode, cross_products, decoder_cosines, nested_widths
from .registry import decoder_rows

__all__ = ["Level", "prefix_levels", "build_tree", "render_html", "write_tree_view"]

class Level(NamedTuple):
    """One level of the tree."""

    name: str
    """Shown in the view (``"ref_128"``, ``"latents 128-511"``)."""
    sae: Any
    """Any SAE with ``encode`` and decoder rows (``registry.decoder_rows``: ``W_dec``,
    ``decoder.weight`` or its registered class's accessor)."""
    latents: tuple[int, int] | None = None
    """``[start, stop)`` of the SAE's latents that form this level; ``None``: all of them."""


def prefix_levels(sae: Any, widths: Sequence[int] | None = None, name: str = "") -> list[Level]:
    """One level per nested group of a Matryoshka SAE: latents ``[0, w1)``, ``[w1, w2)``, ...
    (``widths`` defaults to the SAE's group boundaries, :func:`~matryoshka_plugin.analysis.nested_widths`)."""
    ws = sorted({int(w) for w in (nested_widths(sae) if widths is None else widths)} - {0})
    bounds = list(zip([0] + ws[:-1], ws))
    prefix = f"{name} " if name else ""
    return [Level(f"{prefix}latents {a}-{b - 1}", sae, (a, b)) for a, b in bounds]


@torch.no_grad()
def build_tree(
    levels: Sequence[Level],
    activations: torch.Tensor,
    snippets: Sequence[Any],
    *,
    roots: Sequence[int] | None = None,
    n_roots: int = 5,
    children: int = 3,
    n_snippets: int = 5,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """The tree as plain data (what :func:`render_html` draws).

    ``activations`` ``[tokens, d]`` and ``snippets`` (one per token: a string, or ``(left, token,
    right)`` whose middle is highlighted) are aligned row by row. ``roots`` are latent indices
    within level 0 (default: its ``n_roots`` most frequently firing latents); each node keeps its
    ``children`` most strongly co-firing children. Cost: every level's SAE encodes every token once
    (held in memory: ``tokens x latents`` floats per SAE).
    """
    if len(levels) < 2:
        raise ValueError(f"a tree needs at least two levels, got {len(levels)}")
    if not isinstance(activations, torch.Tensor) or activations.ndim != 2:
        raise ValueError("activations must be a [tokens, d] tensor")
    if len(snippets) != activations.shape[0]:
        raise ValueError(f"{len(snippets)} snippets for {activations.shape[0]} activation rows; "
                         "pass one snippet per token, aligned with the activations")
    # Encode each distinct SAE once.
    encoded: dict[int, torch.Tensor] = {}
    for lvl in levels:
        if id(lvl.sae) not in encoded:
            encoded[id(lvl.sae)] = torch.cat(
                [checked_encode(lvl.sae, x.float(), lvl.name).float().cpu() for x in activations.split(batch_size)])
    acts, decs = [], []
    for lvl in levels:
        f = encoded[id(lvl.sae)]
        a, b = lvl.latents if lvl.latents is not None else (0, f.shape[1])
        if not 0 <= a < b <= f.shape[1]:
            raise ValueError(f"level {lvl.name!r}: latents [{a}, {b}) outside the SAE's {f.shape[1]}")
        acts.append(f[:, a:b])
        decs.append((decoder_rows(lvl.sae)[a:b], a))
    n = activations.shape[0]
    fires = [(f != 0).float() for f in acts]
    counts = [x.sum(0) for x in fires]

    # Best parent of every latent of level i + 1 in level i.
    best_parent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i in range(len(levels) - 1):
        both = cross_products(fires[i + 1], fires[i])  # [child, parent]
        p = both / counts[i + 1].double().clamp_min(1)[:, None]
        cos = decoder_cosines(decs[i + 1][0], decs[i][0])
        score = p + 1e-9 * cos  # P first, the cosine only breaks ties
        j = score.argmax(1)
        pj = p.gather(1, j[:, None])[:, 0]
        best_parent.append((torch.where(pj > 0, j, torch.full_like(j, -1)), pj, cos.gather(1, j[:, None])[:, 0]))

    def node(level: int, idx: int, edge: dict[str, float] | None) -> dict[str, Any]:
        f = acts[level][:, idx]
        top = f.topk(min(n_snippets, n))
        snips = []
        for v, row in zip(top.values.tolist(), top.indices.tolist()):
            if v <= 0:
                break
            s = snippets[row]
            snips.append({"text": s if isinstance(s, str) else list(s), "act": v})
        out = {"level": level, "level_name": levels[level].name, "latent": idx + decs[level][1],
               "fires": float(counts[level][idx]) / n, "max_act": float(f.max()), "snippets": snips,
               "edge": edge, "children": []}
        if level + 1 < len(levels):
            parent, p, cos = best_parent[level]
            mine = (parent == idx).nonzero()[:, 0]
            order = sorted(mine.tolist(), key=lambda c: (-float(p[c]), -float(counts[level + 1][c])))
            out["children"] = [node(level + 1, c, {"p_parent_given_child": float(p[c]), "decoder_cosine": float(cos[c])})
                               for c in order[:children]]
        return out

    if roots is None:
        root_idx = counts[0].argsort(descending=True)[:n_roots].tolist()
        root_idx = [r for r in root_idx if counts[0][r] > 0]
    else:
        width = acts[0].shape[1]
        bad = [r for r in roots if not 0 <= int(r) < width]
        if bad:
            raise ValueError(f"roots {bad} are not latents of level 0 ({levels[0].name!r}, {width} latents)")
        root_idx = [int(r) for r in roots]
    return {"levels": [lvl.name for lvl in levels], "n_tokens": n, "roots": [node(0, r, None) for r in root_idx]}


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.3em}ul.tree{list-style:none;padding-left:1.4em;margin:0;border-left:1px solid #ccc}
ul.tree.top{border-left:none;padding-left:0}li{margin:.3em 0}
summary{cursor:pointer}.name{font-weight:600}.meta{color:#666;font-size:.9em;margin-left:.5em}
.edge{display:inline-block;width:60px;height:8px;background:#eee;margin-left:.5em;vertical-align:middle}
.edge span{display:block;height:100%;background:#2a7ae2}
.snips{margin:.2em 0 .4em 1.2em;font-family:ui-monospace,monospace;font-size:.85em;color:#444}
.snips div{white-space:pre-wrap}mark{background:#ffd54f;padding:0 1px}
.levels{color:#555}button{margin-right:.5em}
"""

_JS = """
(function(){
  var all = document.querySelectorAll('details');
  document.getElementById('expand').onclick = function(){ all.forEach(function(d){ d.open = true; }); };
  document.getElementById('collapse').onclick = function(){ all.forEach(function(d){ d.open = false; }); };
  document.getElementById('count').textContent = document.querySelectorAll('.node').length + ' nodes';
  document.body.setAttribute('data-ready', '1');
})();
"""


# A tree can come from JSON rather than build_tree, so every value written into the page is escaped
# (or, for numbers, formatted from float()), whatever its type.
def _text(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, spec: str, scale: float = 1.0) -> str:
    try:
        return format(scale * float(x), spec)
    except (TypeError, ValueError):
        return _text(x)


def _fraction(x: Any) -> float:
    """A bar width in [0, 1]; anything that is not a number draws an empty bar."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return min(max(v, 0.0), 1.0) if v == v else 0.0


def _snippet_html(s: dict[str, Any]) -> str:
    t = s["text"]
    if isinstance(t, str):
        body = _text(t)
    else:
        left, tok, right = t
        body = f"{_text(left)}<mark>{_text(tok)}</mark>{_text(right)}"
    return f'<div>{_num(s["act"], ".2f")} &nbsp;{body}</div>'


def _node_html(nd: dict[str, Any], depth: int) -> str:
    edge = ""
    if nd["edge"] is not None:
        p, c = nd["edge"]["p_parent_given_child"], nd["edge"]["decoder_cosine"]
        edge = (f'<span class="edge" title="P(parent | child)"><span style="width:{100 * _fraction(p):.0f}%"></span>'
                f'</span><span class="meta">P(parent|child) {_num(p, ".2f")}, decoder cos {_num(c, ".2f")}</span>')
    summary = (f'<span class="name">{_text(nd["level_name"])} #{_text(nd["latent"])}</span>'
               f'<span class="meta">fires on {_num(nd["fires"], ".2f", 100)}% of tokens, '
               f'max {_num(nd["max_act"], ".2f")}</span>{edge}')
    snips = "".join(_snippet_html(s) for s in nd["snippets"])
    kids = "".join(_node_html(k, depth + 1) for k in nd["children"])
    kids_html = f'<ul class="tree">{kids}</ul>' if kids else ""
    open_attr = " open" if depth < 1 else ""
    return (f'<li class="node" data-level="{_text(nd["level"])}" data-latent="{_text(nd["latent"])}">'
            f'<details{open_attr}><summary>{summary}</summary><div class="snips">{snips}</div>{kids_html}'
            "</details></li>")


def render_html(tree: dict[str, Any], title: str = "Latent tree") -> str:
    """One self-contained HTML page (inline CSS and script, nothing fetched) for :func:`build_tree`'s data
    (or the same data read back from JSON: every value is escaped)."""
    levels = " &rarr; ".join(_text(x) for x in tree["levels"])
    nodes = "".join(_node_html(r, 0) for r in tree["roots"])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_text(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_text(title)}</h1>"
        f'<p class="levels">Levels: {levels}. {_text(tree["n_tokens"])} tokens; a child hangs under the parent it '
        "co-fires with most (P(parent fires | child fires)); snippets are each latent's top activations.</p>"
        '<p><button id="expand">expand all</button><button id="collapse">collapse all</button>'
        '<span id="count"></span></p>'
        f'<ul class="tree top">{nodes}</ul><script>{_JS}</script></body></html>\n'
    )


def write_tree_view(
    path: str | Path, levels: Sequence[Level], activations: torch.Tensor, snippets: Sequence[Any], *,
    title: str = "Latent tree", **build_kwargs: Any,
) -> Path:
    """Build the tree (:func:`build_tree`'s keywords) and write it as one HTML file, atomically."""
    from .io import atomic_open

    path = Path(path)
    page = render_html(build_tree(levels, activations, snippets, **build_kwargs), title)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
