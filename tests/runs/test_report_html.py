"""report.html and cv.html: one self-contained page per run and per cv, drawn by a real browser.

The page is built from report.md, so every heading of the markdown must be in it; every image is a data
URI and nothing points at the network (a pathologist opens it by double-click, often offline). The
browser test renders it with Debian's chromium-headless-shell and checks the screenshot is drawn."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report_breakdown import SOURCES, _prediction_rows, make_run

from cornpipe.runs.html_report import render_html
from cornpipe.runs.report import write_report

BROWSERS = ("chromium-headless-shell", "chromium", "chrome-headless-shell", "google-chrome", "chrome")


class Page(HTMLParser):
    """The parts of a page the tests read: heading texts, every src/href, tag names."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [(tag, k, v or "") for k, v in attrs if k in ("src", "href")]
        if re.fullmatch(r"h[1-6]", tag):
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def md_headings(md: Path) -> list[str]:
    """Heading texts as a reader sees them (markdown's backticks and bold marks dropped)."""
    return [re.sub(r"[`*]", "", line.lstrip("#").strip()) for line in md.read_text().splitlines()
            if re.match(r"#{1,6} ", line)]


def assert_self_contained(page: Page, images: int) -> None:
    srcs = [v for tag, k, v in page.urls if tag == "img"]
    assert len(srcs) == images
    assert all(v.startswith("data:image/png;base64,") for v in srcs)
    assert not [v for _, _, v in page.urls if re.match(r"\s*(https?:)?//", v, re.IGNORECASE)]
    assert not {"script", "link", "iframe"} & set(page.tags)


def test_report_html_holds_every_section_of_report_md_and_embeds_its_images(tmp_path: Path) -> None:
    md = write_report(make_run(tmp_path, _prediction_rows(SOURCES)))
    page = parse(md.with_suffix(".html"))
    headings = md_headings(md)
    assert "Curves" in headings and any(h.startswith("Breakdown by source") for h in headings)
    assert all(h in page.headings for h in headings)
    # curves, position confusion, grade confusion: each PNG the report draws is linked and embedded
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    assert sorted(linked) == ["confusion_matrix.png", "curves.png", "grade_confusion.png"]
    assert_self_contained(page, images=3)
    assert "Contents" in md.with_suffix(".html").read_text()


def test_a_section_another_module_adds_to_report_md_shows_in_the_page(tmp_path: Path) -> None:
    """The page follows the markdown: a new section with its own image needs no HTML code."""
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "cam_panel.png")
    text = ("# Report\n\nOpening sentence.\n\n## Activation maps\n\nWhat the model looks at.\n\n"
            "![activation maps](cam_panel.png)\n")
    (tmp_path / "page.html").write_text(render_html(text, tmp_path, "Report"))
    page = parse(tmp_path / "page.html")
    assert page.headings == ["Report", "Activation maps"]
    assert_self_contained(page, images=1)


def test_nothing_in_the_page_reaches_the_network_and_raw_html_is_text(tmp_path: Path) -> None:
    text = ("# R\n\nsource <script>alert(1)</script>\n\n## S\n\n![far](https://example.org/x.png) "
            "[docs](http://example.org) <https://example.org/a> ![gone](absent.png)\n")
    out = render_html(text, tmp_path, "R")
    (tmp_path / "page.html").write_text(out)
    page = parse(tmp_path / "page.html")
    assert_self_contained(page, images=0)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out  # a source name is shown, never run
    assert "remote image, not loaded" in out and "image file missing" in out


def test_cv_html_beside_cv_md(tmp_path: Path) -> None:
    from test_cv import fake_cv_dir

    from cornpipe.runs.cv import write_summary

    fake_cv_dir(tmp_path, 30, 3, [0])
    write_summary(tmp_path, [(f, 0) for f in range(3)])
    page = parse(tmp_path / "cv.html")
    assert all(h in page.headings for h in md_headings(tmp_path / "cv.md"))
    assert_self_contained(page, images=3)  # pooled position confusion, grade confusion, reliability diagram


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, png: Path, profile: Path) -> np.ndarray:
    browser = find_browser()
    if browser is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"no headless chromium on PATH (tried {', '.join(BROWSERS)}): `make sysdeps` installs "
                        "chromium-headless-shell, and CI must test the page in a real browser")
        pytest.skip("no headless chromium on PATH: `make sysdeps` installs chromium-headless-shell")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,3000",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("L"), dtype=np.float32)


def assert_drawn(pixels: np.ndarray) -> None:
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 20  # text, tables and plots, not a blank or one-colour page
    assert (pixels < 200).mean() > 0.03  # a fair share of the page is ink (text, borders, plots)
    assert (pixels[:600] < 200).mean() > 0.01  # the title, the headline box and the contents come first


def test_report_html_and_cv_html_are_drawn_by_a_real_browser(tmp_path: Path) -> None:
    from test_cv import fake_cv_dir

    from cornpipe.runs.cv import write_summary

    run, cv = tmp_path / "run", tmp_path / "cv"
    run.mkdir()
    write_report(make_run(run, _prediction_rows(SOURCES)))
    assert_drawn(screenshot(run / "report.html", tmp_path / "report.png", tmp_path / "profile"))
    fake_cv_dir(cv, 30, 3, [0])
    write_summary(cv, [(f, 0) for f in range(3)])
    assert_drawn(screenshot(cv / "cv.html", tmp_path / "cv.png", tmp_path / "profile"))


def test_under_ci_a_missing_browser_fails_instead_of_skipping(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no headless chromium"):
        screenshot(tmp_path / "report.html", tmp_path / "shot.png", tmp_path / "profile")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        screenshot(tmp_path / "report.html", tmp_path / "shot.png", tmp_path / "profile")
