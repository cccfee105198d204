"""report.html beside report.md (and cv.html beside cv.md): one self-contained page a pathologist opens
by double-click.

The page is rendered FROM the markdown the report already writes, so any section added to report.md
shows here too: headings, paragraphs, lists, pipe tables, bold, inline code and `![alt](file.png)`
images. Images are read from the report's folder and embedded as base64 data URIs; the style sheet is
inline; nothing is loaded from the network (a remote image or link is shown as text, never fetched),
and raw HTML in the markdown is shown as text, not run (source folder names are data).
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: "Segoe UI", "Helvetica Neue", Arial, "Liberation Sans", sans-serif; font-size: 17px;
       line-height: 1.55; color: #1f2328; background: #fff; max-width: 1100px; margin: 0 auto; padding: 24px 32px; }
h1 { font-size: 1.9em; border-bottom: 3px solid #2e7d32; padding-bottom: 6px; margin-top: 0; }
h2 { font-size: 1.45em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 1.8em; }
h3 { font-size: 1.2em; margin-top: 1.4em; }
h1 + p { background: #f1f8e9; border-left: 6px solid #2e7d32; padding: 12px 16px; font-size: 1.1em; }
nav.toc { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 18px; margin: 16px 0; }
nav.toc ul { margin: 4px 0; padding-left: 20px; }
nav.toc > ul { padding-left: 4px; list-style: none; }
nav.toc a { color: #0b5394; text-decoration: none; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.95em; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #8c959f; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #e8eef3; }
tr:nth-child(even) td { background: #f8fafb; }
img { max-width: 100%; height: auto; display: block; margin: 12px 0; border: 1px solid #d0d7de; }
code { background: #eff1f3; padding: 1px 5px; border-radius: 4px; font-size: 0.9em; }
.missing { color: #b3261e; font-style: italic; }
footer { margin-top: 3em; color: #57606a; font-size: 0.85em; }
@media print { nav.toc { display: none; } body { max-width: none; } }
"""

_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, ftp:, //host ... anything with a scheme


def html_path(md_path: Path | str) -> Path:
    """report.md -> report.html, cv.md -> cv.html: the page lives beside its markdown."""
    return Path(md_path).with_suffix(".html")


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _self_contained(root: Any, base: Path) -> None:
    """Embed every local image as a data URI; turn what would load or lead off the machine into text."""
    parent = {child: node for node in root.iter() for child in node}
    for img in list(root.iter("img")):
        src = img.get("src", "")
        path = base / src
        if not _REMOTE.match(src) and not src.startswith("/") and path.is_file():
            img.set("src", _data_uri(path))
            img.set("title", img.get("alt") or src)
            continue
        why = "remote image, not loaded" if _REMOTE.match(src) or src.startswith("//") else "image file missing"
        span = img.makeelement("span", {"class": "missing"})
        span.text = f"[{img.get('alt') or 'image'}: {src} ({why})]"
        span.tail = img.tail
        node = parent[img]
        node.insert(list(node).index(img), span)
        node.remove(img)
    for link in root.iter("a"):
        href = link.get("href", "")
        if _REMOTE.match(href) or href.startswith("//"):  # shown, not followed: the page stays offline
            del link.attrib["href"]
            link.text = href if link.text in (None, "", href) else f"{link.text} ({href})"


def render_html(markdown_text: str, base: Path | str, title: str) -> str:
    """The full page for `markdown_text`, images read from `base`: table of contents after the opening
    sentence, inline CSS, no script, nothing fetched."""
    import markdown
    from markdown.treeprocessors import Treeprocessor

    base = Path(base)

    class Embed(Treeprocessor):
        def run(self, root: Any) -> None:
            _self_contained(root, base)

    md = markdown.Markdown(extensions=["tables", "toc", "sane_lists"],
                          extension_configs={"toc": {"toc_depth": "2-3"}})
    md.preprocessors.deregister("html_block")  # raw HTML in the report is data: escape it, never run it
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(Embed(md), "cornpipe_embed", 0)
    body = md.convert(markdown_text)
    toc = getattr(md, "toc", "")
    nav = f'<nav class="toc"><strong>Contents</strong>{toc}</nav>\n' if "<li>" in toc else ""
    # the table of contents goes after the title and its one-sentence headline, which a reader sees first
    match = re.search(r"</h1>\s*(<p>.*?</p>)?", body, re.DOTALL)
    at = match.end() if match else 0
    body = body[:at] + "\n" + nav + body[at:]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n"
            "<footer>Written by cornpipe beside the markdown of the same name; images are embedded, so this "
            "file can be moved or mailed on its own.</footer>\n</body>\n</html>\n")


def write_html(md_path: Path | str, out: Path | str | None = None) -> Path:
    """Render `md_path` (report.md, cv.md) to `out` (the .html beside it unless given), written whole or
    not at all; the page's title is the markdown's first heading."""
    md_path = Path(md_path)
    text = md_path.read_text(encoding="utf-8")
    first = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), md_path.stem)
    out = html_path(md_path) if out is None else Path(out)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(render_html(text, md_path.parent, first), encoding="utf-8")
    tmp.replace(out)
    return out
