"""The pieces every report page shares: escaping, number formatting, the page shell with its
Content-Security-Policy and style, and the images written beside the pages.

All text from data, tokenizers, labels and configs passes through `e` (html.escape). A page's only
script is a fixed string allowed by its hash in the CSP, so a `<script>` or an `onerror=` in a
dataset line shows as text and cannot run, even if a value were ever left unescaped."""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

STYLE = """
:root { --ink: #222; --muted: #666; --line: #ddd; --pos: #b2182b; --neg: #2166ac; }
body { font-family: system-ui, sans-serif; margin: 0; color: var(--ink); font-size: 15px; }
header.top { background: #f4f4f6; border-bottom: 1px solid var(--line);
             padding: 0.5rem 1.5rem; display: flex; gap: 1.5rem; align-items: baseline;
             flex-wrap: wrap; }
header.top a { color: inherit; }
main { padding: 0.5rem 1.5rem 3rem; max-width: 90rem; }
h1 { font-size: 1.4rem; margin: 0.6rem 0; } h2 { font-size: 1.15rem; margin: 1.2rem 0 0.4rem; }
h3 { font-size: 1rem; margin: 1rem 0 0.3rem; }
.note { color: var(--muted); font-size: 0.85rem; margin: 0.2rem 0; }
.flag { color: #b3261e; }
.row { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.row > * { flex: 0 1 auto; min-width: 0; }
table { border-collapse: collapse; font-size: 0.88rem; }
td, th { border-bottom: 1px solid var(--line); padding: 0.15rem 0.5rem; text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
th { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.dead { color: #a33; font-weight: 600; }
.pos { color: var(--pos); } .neg { color: var(--neg); }
figure { margin: 0; } figcaption { font-size: 0.8rem; color: var(--muted); max-width: 40rem; }
img.pixel { image-rendering: pixelated; border: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; }
svg text { font-family: system-ui, sans-serif; }
"""


def e(value: object) -> str:
    """HTML-escape anything shown on a page (data, tokens, labels, config values)."""
    return html.escape(str(value), quote=True)


def fmt(value: float | None) -> str:
    """A number in 4 significant digits; None, NaN and infinities say what they are."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "not finite"
    return f"{value:.4g}"


def table(items: Mapping[str, object]) -> str:
    """A two-column table of name → value, both escaped."""
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in items.items())
    return f"<table>{rows}</table>"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of PNG bytes (from the IHDR chunk). Every image gets its size on the
    page, so lazy images loading above an anchor never push the anchored row off the screen."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def img(src: str, alt: str, size: tuple[int, int] | None = None, css: str = "") -> str:
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    cls = f' class="{css}"' if css else ""
    return f'<img src="{e(src)}" alt="{e(alt)}"{dims}{cls} loading="lazy">'


def page(title: str, header: str, body: str, script: str = "", style: str = "") -> str:
    """A whole HTML document: CSP admitting only `script` (by its sha256), inline styles and
    local images, nothing from the network."""
    script_src = "'none'"
    if script:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        script_src = f"'sha256-{digest}'"
    csp = (
        "default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; "
        f"script-src {script_src}"
    )
    tag = f"<script>{script}</script>" if script else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{e(title)}</title><style>{STYLE}{style}</style></head>
<body><header class="top">{header}</header>
<main>{body}</main>{tag}
</body></html>
"""


class Assets:
    """Images under the report folder, referenced by URLs relative to the report's root (pages
    in subfolders prefix them with `../`)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / "img").mkdir(parents=True)

    def png(self, name: str, data: bytes) -> str:
        # img/ is made afresh for every report: no reader can see an older version of this file,
        # so a plain write does (an fsync per image made 1,000-subnetwork reports 3x slower).
        (self.out / "img" / name).write_bytes(data)
        return f"img/{quote(name)}"

    def has(self, name: str) -> str | None:
        return f"img/{quote(name)}" if (self.out / "img" / name).is_file() else None
