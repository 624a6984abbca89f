"""The HTML side shared by eval's report.html and the pairs gallery of `prefpipe show`.

- :func:`render`: a page from the jinja2 templates in `templates/` (package data), with autoescape on, so
  every caption, prompt and name is escaped by the template; only images (data URIs) are marked safe.
  `base.html` is the document (it inlines `page.css`); `report.html` (with `sort.js`) and `pairs.html`
  extend it.
- :func:`image_data_uri`, :func:`png_data_uri`: images embedded as data URIs, so a page opens from disk with
  no server and no network.
- :func:`fmt`, :func:`pct`, :func:`signed`: how numbers are shown (also the templates' filters of the same
  names); None and non-finite values show as "—".
"""

from __future__ import annotations

import base64
import io
import math
from functools import cache
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
BROWSER_MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
DISPLAY_PX = 160  # width of report.html's gallery images on the page; smaller images are drawn pixelated


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def signed(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.4g}"


@cache
def environment():
    """The jinja2 environment over `templates/`: autoescape on, undefined names are errors."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, pct=pct, signed=signed)
    env.globals["display_px"] = DISPLAY_PX
    return env


def render(template: str, **context) -> str:
    """The page `template` (a file of `templates/`) rendered with `context`: a complete HTML document."""
    return environment().get_template(template).render(**context)


def image_data_uri(data: bytes | None, max_side: int) -> tuple[str, tuple[int, int]]:
    """A data URI the browser shows, and the image's (width, height).

    Images a browser decodes and no larger than `max_side` are embedded as they are (exact pixels);
    larger ones, or other formats, are shrunk to fit `max_side` and re-encoded as JPEG (quality 88).
    Raises `prefpipe.core.images.BadImage` on bytes that do not decode.
    """
    from PIL import Image

    from prefpipe.core.images import decode

    im = decode(data)
    size = im.size
    mime = BROWSER_MIMES.get(im.format or "")
    if mime and max(size) <= max_side:
        return f"data:{mime};base64,{base64.b64encode(data).decode()}", size
    im = im.convert("RGB")
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}", size


def png_data_uri(path: str | Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()}"
