"""matryoshka_plugin.tree_view: the tree on constructed SAEs, and the page in headless Chromium."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import linear_sae

from matryoshka_plugin.sae import MatryoshkaBatchTopKSAE
from matryoshka_plugin.tree_view import Level, build_tree, prefix_levels, render_html, write_tree_view

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


def _family():
    """Two constructed SAEs and tokens with known co-firing (as in test_analysis)."""
    e = torch.eye(4)
    x = torch.cat([(e[0] + e[1]).expand(30, 4), e[0].expand(20, 4), e[1].expand(10, 4),
                   (e[2] + e[3]).expand(15, 4), e[2].expand(5, 4)])
    # Scale each token a little so the top snippets have a defined order.
    x = x * torch.linspace(1.0, 1.5, len(x))[:, None]
    s = 1 / math.sqrt(2)
    parent = linear_sae([[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 0, 0, 0], [0, 0, 1, 0]])
    child = linear_sae([[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [-1, -1, -1, -1]],
                        [[s, s, 0, 0], [0, 0, -s, s], [1, 0, 0, 0], [0, 0, 0, 1]])
    snippets = [(f"row {i} <", f"t{i}", "> & more") for i in range(len(x))]
    return parent, child, x, snippets


def _count(node) -> int:
    return 1 + sum(_count(c) for c in node["children"])


def test_tree_known_structure():
    parent, child, x, snippets = _family()
    tree = build_tree([Level("parent", parent), Level("child", child)], x, snippets, children=5, n_snippets=3)
    assert [r["latent"] for r in tree["roots"]] == [0, 1]  # parent 0 fires on 50 tokens, parent 1 on 20
    p0, p1 = tree["roots"]
    assert p0["fires"] == pytest.approx(50 / 80) and p1["fires"] == pytest.approx(20 / 80)
    assert [c["latent"] for c in p0["children"]] == [2, 0] and [c["latent"] for c in p1["children"]] == [1]
    assert p0["children"][0]["edge"] == pytest.approx({"p_parent_given_child": 1.0, "decoder_cosine": 1.0})
    assert p0["children"][1]["edge"] == pytest.approx({"p_parent_given_child": 0.75, "decoder_cosine": 1 / math.sqrt(2)})
    # Top snippets: the largest activations. Parent 0 fires on rows 0-49, the latest rows scaled most.
    assert [s["text"][1] for s in p0["snippets"]] == ["t49", "t48", "t47"]
    assert tree["n_tokens"] == 80
    # Roots by hand; children capped.
    tree = build_tree([Level("parent", parent), Level("child", child)], x, snippets, roots=[1], children=1)
    assert [r["latent"] for r in tree["roots"]] == [1] and len(tree["roots"][0]["children"]) == 1


def test_prefix_levels_and_bad_input():
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(4, 12, k=2, group_sizes=[2, 4, 6])
    levels = prefix_levels(sae, name="m")
    assert [lvl.latents for lvl in levels] == [(0, 2), (2, 6), (6, 12)]
    assert levels[1].name == "m latents 2-5"
    parent, child, x, snippets = _family()
    with pytest.raises(ValueError, match="snippets for 80 activation rows"):
        build_tree([Level("p", parent), Level("c", child)], x, snippets[:-1])
    with pytest.raises(ValueError, match="at least two levels"):
        build_tree([Level("p", parent)], x, snippets)
    with pytest.raises(ValueError, match="roots"):
        build_tree([Level("p", parent), Level("c", child)], x, snippets, roots=[5])


def test_page_escapes_text_and_fetches_nothing(tmp_path: Path):
    parent, child, x, snippets = _family()
    snippets[49] = ("<script>alert(1)</script>", "<b>", "</html>")
    path = write_tree_view(tmp_path / "t.html", [Level("p", parent), Level("c", child)], x, snippets, title="a<b")
    page = path.read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>a&lt;b</title>" in page
    # Self-contained: no external resources of any kind.
    assert not re.search(r"\b(src|href)\s*=|<link|@import|url\(", page)
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left behind


SCRIPT = "<script>alert(1)</script>"
ATTR = '"><img src=x onerror=alert(2)>'


def _hostile_tree(tmp_path: Path) -> dict:
    """build_tree's output written to JSON, edited by someone hostile, and read back."""
    import json

    parent, child, x, snippets = _family()
    tree = build_tree([Level("p", parent), Level("c", child)], x, snippets)
    tree["n_tokens"] = SCRIPT
    tree["levels"][0] = ATTR
    root = tree["roots"][0]
    root.update(latent=ATTR, level=SCRIPT, level_name=SCRIPT, fires=ATTR, max_act=SCRIPT)
    kid = root["children"][0]
    kid.update(latent=SCRIPT, level=ATTR)
    kid["edge"] = {"p_parent_given_child": ATTR, "decoder_cosine": SCRIPT}
    kid["snippets"] = [{"text": [SCRIPT, ATTR, "</ul><b>boom</b>"], "act": ATTR}, {"text": ATTR, "act": SCRIPT}]
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(tree))
    return json.loads(path.read_text())


def test_page_escapes_every_value_of_a_tree_loaded_from_json(tmp_path: Path):
    from html.parser import HTMLParser

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.tags, self.attrs, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.attrs += attrs

        def handle_data(self, data):
            self.text.append(data)

    page = render_html(_hostile_tree(tmp_path), "hostile")
    for payload in (SCRIPT, ATTR, "<img", "<b>boom"):
        assert payload not in page
    parsed = Tags()
    parsed.feed(page)
    # Only the page's own markup: one script (its own), no <img>, no event-handler attributes.
    assert parsed.tags.count("script") == 1 and "img" not in parsed.tags
    assert not [a for a, _ in parsed.attrs if a.startswith("on") or a == "src"]
    assert set(parsed.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "p", "button", "span", "ul",
                                "li", "details", "summary", "div", "mark", "script"}
    # The hostile values are shown as text, and land in the attributes as plain values.
    text = "".join(parsed.text)
    assert text.count(SCRIPT) >= 6 and text.count(ATTR) >= 5
    assert ("data-latent", ATTR) in parsed.attrs and ("data-level", SCRIPT) in parsed.attrs
    assert ("data-latent", SCRIPT) in parsed.attrs and ("data-level", ATTR) in parsed.attrs
    assert ("style", "width:0%") in parsed.attrs  # a non-number P(parent|child) draws an empty bar


def _chromium(page: Path, out: Path) -> tuple[str, list[str], bytes]:
    """Load ``page`` from file:// in headless Chromium: (DOM after scripts ran, console lines, PNG)."""
    shot = out / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={out / 'profile'}", "--window-size=1000,800", "--dump-dom", f"--screenshot={shot}",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console, shot.read_bytes() if shot.is_file() else b""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (SETUP_BROWSER=1 bash scripts/setup.sh installs "
                                              "it with apt-get as root; or: apt-get install -y chromium)")
def test_page_in_headless_chromium(tmp_path: Path):
    import io

    from PIL import Image

    parent, child, x, snippets = _family()
    levels = [Level("parent", parent), Level("child", child)] + prefix_levels(child, name="child")
    tree = build_tree(levels, x, snippets, children=5)
    n_nodes = sum(_count(r) for r in tree["roots"])
    page = tmp_path / "tree.html"
    page.write_text(render_html(tree, "constructed family"))
    dom, console, png = _chromium(page, tmp_path)
    assert console == []
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    assert len(re.findall(r'<li class="node"', dom)) == n_nodes and f"{n_nodes} nodes" in dom
    img = Image.open(io.BytesIO(png)).convert("L")
    assert img.size == (1000, 800)
    dark = sum(img.histogram()[:200])  # pixels clearly darker than the white background: text, bars
    assert dark > 0.01 * img.size[0] * img.size[1]

    # The console check can fail: a page with a script error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>missingFunction();</script></body></html>")
    _, console, _ = _chromium(bad, tmp_path / "b")
    assert any("missingFunction" in line for line in console)
