"""Headless Chromium (Debian's package) driven by Playwright, for the web demo tests."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch_browser():
    """(playwright, browser); skipped off CI when Chromium or Playwright is missing (CI installs both)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed")
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            raise RuntimeError(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed")
    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def wait_until(page, predicate, timeout_s: float = 30.0, what: str = "condition"):
    """Poll predicate() (Python side) until true."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {what}")


def screenshot(page, name: str) -> str:
    """Save a screenshot in $SCREENSHOT_DIR (`SCREENSHOT_DIR=resources` refreshes the README's), else a temp folder."""
    import tempfile

    global _shots
    folder = os.environ.get("SCREENSHOT_DIR") or _shots or tempfile.mkdtemp(prefix="web-demo-shots-")
    _shots = _shots or folder
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    page.screenshot(path=path)
    return path


_shots = None

# Chat payloads that change the page's title if the page runs them (the links: when clicked).
PWN = "top.document.title='PWNED'"
PAYLOADS = [f"<script>{PWN}</script>",
            f'<iframe srcdoc="<script>top.document.title=&quot;PWNED&quot;</script>"></iframe>',
            f'<img src=x onerror="{PWN}">',
            f'<svg onload="{PWN}"><circle r="5"/></svg>',
            "[click me](javascript:top.document.title=%22PWNED%22)",
            f'<a href="javascript:{PWN}">click me too</a>']
PAYLOAD_TEXT = "Watch: " + " and ".join(PAYLOADS) + " end."

# Elements under `selector` that could run script: script / iframe / object / embed, on* handlers, srcdoc,
# javascript: addresses. Run in a page or frame; returns their HTML (empty: none).
DANGER = """(selector) => {
    const found = [];
    for (const root of document.querySelectorAll(selector)) {
        for (const el of root.querySelectorAll('*')) {
            const tag = el.tagName.toLowerCase();
            const attrs = [...el.attributes];
            if (['script', 'iframe', 'object', 'embed', 'frame'].includes(tag)
                || attrs.some(a => a.name.startsWith('on') || a.name === 'srcdoc'
                              || /^\\s*(javascript|vbscript|data):/i.test(a.value.replace(/[\\x00-\\x20]/g, ''))
                                 && ['href', 'src', 'xlink:href', 'action', 'formaction'].includes(a.name)))
                found.push(el.outerHTML.slice(0, 200));
        }
    }
    return found;
}"""

# Records in window.danger whatever DANGER finds under selector at any moment (a streamed reply's middle too).
WATCH_DANGER = """(selector) => {
    window.danger = [];
    const scan = """ + DANGER + """;
    new MutationObserver(() => { window.danger.push(...scan(selector)); })
        .observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def click_links(page_or_frame, text: str) -> None:
    """Click each link whose text contains text (a javascript: one would run now)."""
    links = page_or_frame.locator("a", has_text=text)
    for i in range(links.count()):
        links.nth(i).click(timeout=5000, no_wait_after=True)
