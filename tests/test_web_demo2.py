"""web_demo2.py (Streamlit + streamlit-chat) in headless Chromium: streamed reply, bubbles, Stop, Clear, script in
messages, markdown and LaTeX, errors, login, and where and how it listens (scripted engine: tests/scripted_demo.py)."""

import re
import socket
import subprocess
import sys

import httpx
import pytest

from browser import DANGER, PAYLOAD_TEXT, WATCH_DANGER, click_links, screenshot, wait_until
from conftest import ROOT
from scripted_demo import LONG, closing_cancels, say
from serving import ServerProcess, free_port

pytestmark = pytest.mark.browser
SCRIPTED = "tests/scripted_demo.py"
HEALTH = "/_stcore/health"
BUBBLE = "iframe[title='streamlit_chat.streamlit_chat']"


@pytest.fixture(scope="module")
def st_demo(v3_dir):
    with ServerProcess(SCRIPTED, v3_dir, ready_path=HEALTH, streamlit=True) as server:
        yield server


def open_page(browser, url, ready="stChatInputTextArea"):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url, timeout=60_000)
    page.get_by_test_id(ready).wait_for(timeout=60_000)
    return page


def send(page, text):
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def streaming_length(page) -> int:
    """Length of the reply being streamed, -1 when there is none. One read in the page: counting the element
    and then reading it raced with the rerun that removes it (the read then waited 30 s for it)."""
    return page.evaluate("() => { const r = document.querySelector('#streaming-reply');"
                         " return r ? r.innerText.length : -1; }")


def bubble_texts(page) -> list[str]:
    """Text of each chat bubble (an iframe each); a bubble being redrawn reads as "" (callers poll)."""
    from playwright.sync_api import Error

    texts = []
    for i in range(page.locator(BUBBLE).count()):
        try:
            texts.append(page.frame_locator(BUBBLE).nth(i).locator("body").inner_text(timeout=2000).strip())
        except Error:  # the page re-ran and this iframe went away or is not loaded yet
            texts.append("")
    return texts


def wait_bubbles(page, *texts: str, timeout_s: float = 60) -> None:
    """Until the chat bubbles read texts (regular expressions, searched), no reply streaming."""
    def done():
        shown = bubble_texts(page)
        return (len(shown) == len(texts) and streaming_length(page) == -1
                and all(re.search(t, s) for t, s in zip(texts, shown)))
    wait_until(page, done, timeout_s=timeout_s, what=f"the bubbles {texts}")


def bubble_frames(page):
    return [f for f in page.frames if "streamlit_chat" in f.url]


# Every length the streaming reply shows, recorded in the page: polling from here can miss a short reply's steps.
WATCH_STREAM = """() => {
    window.streamed = new Set();
    new MutationObserver(() => {
        const r = document.querySelector('#streaming-reply');
        if (r) window.streamed.add(r.innerText.length);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_reply_streams_then_shows_as_a_bubble_and_clear_removes_it(st_demo, browser):
    page = open_page(browser, st_demo.url)
    page.evaluate(WATCH_STREAM)
    send(page, "你好")
    wait_bubbles(page, "^你好$", r"^Reply \d+: this is a scripted reply\.$")
    assert len(page.evaluate("[...window.streamed]")) >= 2  # shown growing before it became a bubble
    screenshot(page, "web_demo2.png")
    page.get_by_role("button", name="Clear history").click()
    wait_until(page, lambda: not bubble_texts(page), what="the history to clear")


def test_stop_keeps_what_was_written_and_ends_the_reply(st_demo, browser):
    page = open_page(browser, st_demo.url)
    send(page, LONG)
    wait_until(page, lambda: streaming_length(page) > 100, what="a long reply to be streaming")
    page.get_by_role("button", name="Stop").first.click()
    wait_bubbles(page, LONG, "^word0 word1 .{50,}")
    kept = bubble_texts(page)[1]
    # the next message gets its reply, and the stopped one, redrawn with it, has not grown
    send(page, say("next"))
    wait_bubbles(page, LONG, "word0", "next", "^next$")
    assert bubble_texts(page)[1] == kept


def test_closing_the_tab_stops_its_reply(st_demo, browser):
    """Nobody reads a reply whose page was closed: the demo stops it (freeing its row of the batch) rather
    than let it run to the length limit."""
    page = open_page(browser, st_demo.url)
    send(page, f"{LONG}, then close the tab")
    wait_until(page, lambda: streaming_length(page) > 40, what="the reply to start")
    assert closing_cancels(page, st_demo), "the closed tab's reply was still being written 20 s later"


@pytest.mark.parametrize("who", ["user", "model"])
def test_script_in_a_message_or_reply_never_runs(st_demo, browser, who):
    """HTML in the user's message or the model's reply, while it streams and in its bubble, runs nothing."""
    page = open_page(browser, st_demo.url)
    page.evaluate(WATCH_DANGER, "#streaming-reply")
    title = page.title()
    if who == "user":
        send(page, f"{PAYLOAD_TEXT} {say('done')}")
        wait_bubbles(page, "Watch: <script>", "^done$")
    else:
        send(page, say(PAYLOAD_TEXT))
        wait_until(page, lambda: streaming_length(page) > 0, what="the reply to stream")
        wait_bubbles(page, "Watch: <script>", r"^Watch: <script>.*<img src=x onerror=.*end\.$")
    assert page.evaluate("window.danger") == [], "the streaming reply held something able to run script"
    for frame in bubble_frames(page):
        click_links(frame, "click me")
        assert frame.evaluate(DANGER, ".msg") == []
    assert page.title() == title != "PWNED"


def test_markdown_and_latex_render_and_a_lone_dollar_is_text(st_demo, browser):
    page = open_page(browser, st_demo.url)
    send(page, say("**bold**, `<code>`, $x^2$, \\(y<z\\) and it costs $5"))
    wait_bubbles(page, "bold", "bold")
    frame = bubble_frames(page)[-1]
    assert frame.locator(".msg strong").inner_text() == "bold"
    assert frame.locator(".msg code").inner_text() == "<code>"
    assert frame.locator(".msg math").count() == 2
    text = frame.locator(".msg").inner_text()
    assert "costs $5" in text and "formula incomplete" not in text and "convert-error" not in text


def test_surrogate_in_a_message_leaves_the_chat_working(st_demo, browser):
    """Streamlit's server drops the connection on a message holding a lone surrogate (its protobuf is no UTF-8);
    the page reconnects and the chat, history included, goes on. (The reply function answers such text itself:
    tests/test_web_text.py.)"""
    page = open_page(browser, st_demo.url)
    send(page, say("first"))
    wait_bubbles(page, "first", "^first$")
    page.evaluate("""() => {
        window.connection = [];
        new MutationObserver(() => window.connection.push(
            document.querySelector('[data-test-connection-state]').dataset.testConnectionState))
            .observe(document.body, {subtree: true, attributes: true, attributeFilter: ['data-test-connection-state']});
    }""")
    box = page.get_by_test_id("stChatInputTextArea")
    # set in the page: Python cannot hand Playwright a lone surrogate (it is no UTF-8)
    box.evaluate("(box, text) => { const set = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype,"
                 " 'value').set; set.call(box, text.replace('?', '\\ud800'));"
                 " box.dispatchEvent(new Event('input', {bubbles: true})); }", say("a?b"))
    box.press("Enter")
    state = lambda: page.locator("[data-test-connection-state]").get_attribute("data-test-connection-state")  # noqa
    wait_until(page, lambda: bubble_texts(page)[-1:] == ["a\ufffdb"] or (
        any(s != "CONNECTED" for s in page.evaluate("window.connection")) and state() == "CONNECTED"),
        what="an answer, or the page connected again")
    send(page, say("still here"))
    wait_until(page, lambda: bubble_texts(page)[-1:] == ["still here"], what="the next reply")
    assert bubble_texts(page)[:2] == [say("first"), "first"]


def test_too_long_names_the_slider(st_demo, browser):
    page = open_page(browser, st_demo.url)
    slider = page.locator("input[type=range][aria-label=max_length]")
    slider.focus()
    slider.press("Home")  # 0: every conversation is too long
    wait_until(page, lambda: slider.input_value() == "0", what="max_length 0")
    send(page, "hello")
    error = page.get_by_test_id("stAlert")
    error.wait_for()
    assert "raise max_length" in error.inner_text()


def test_login_gates_the_chat(v3_dir, browser):
    with ServerProcess(SCRIPTED, v3_dir, "--auth", "ada:s3cret", ready_path=HEALTH, streamlit=True) as server:
        page = open_page(browser, server.url, ready="stForm")
        assert page.get_by_test_id("stChatInputTextArea").count() == 0
        page.get_by_label("User").fill("ada")
        page.get_by_role("textbox", name="Password").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        page.get_by_text("Wrong user or password").wait_for()
        assert page.get_by_test_id("stChatInputTextArea").count() == 0
        page.get_by_role("textbox", name="Password").fill("s3cret")
        page.get_by_role("button", name="Log in").click()
        page.get_by_test_id("stChatInputTextArea").wait_for()
        send(page, say("in"))
        wait_bubbles(page, "in", "^in$")


def _other_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_python_start_listens_locally_without_stats_or_deploy_button(v3_dir, browser):
    with ServerProcess("web_demo2.py", v3_dir, ready_path=HEALTH) as server:
        page = browser.new_page()
        outside = []  # usage statistics would go to Streamlit's servers from the page
        page.on("request", lambda r: r.url.startswith(("http://127.0.0.1", "data:")) or outside.append(r.url))
        page.goto(server.url, timeout=60_000)
        page.get_by_test_id("stChatInputTextArea").wait_for(timeout=60_000)  # the model is loaded
        assert page.get_by_test_id("stAppDeployButton").count() == 0
        assert outside == []
        other = _other_address()
        if other:
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://{other}:{server.port}{HEALTH}", timeout=5)
        server.stop()
        log = server.output()
    assert f"http://127.0.0.1:{server.port}" in log and "Network URL" not in log, log


def test_host_flag_with_streamlit_run(v3_dir, browser):
    with ServerProcess(SCRIPTED, v3_dir, "--host", "127.0.0.1", ready_path=HEALTH, streamlit=True) as server:
        open_page(browser, server.url)  # agrees with the address Streamlit was given: the chat is served
    with ServerProcess(SCRIPTED, v3_dir, "--host", "0.0.0.0", ready_path=HEALTH, streamlit=True) as server:
        page = open_page(browser, server.url, ready="stAlert")
        assert "--host is 0.0.0.0" in page.get_by_test_id("stAlert").inner_text()
        assert page.get_by_test_id("stChatInputTextArea").count() == 0


def test_a_bad_flag_is_reported_in_the_page_and_the_terminal(v3_dir, browser):
    with ServerProcess(SCRIPTED, v3_dir, "--bogus", ready_path=HEALTH, streamlit=True) as server:
        page = open_page(browser, server.url, ready="stAlert")
        assert "unrecognized arguments: --bogus" in page.get_by_test_id("stAlert").inner_text()
        server.stop()
        assert "unrecognized arguments: --bogus" in server.output()
    started = subprocess.run([sys.executable, "web_demo2.py", "--port", str(free_port()), "--bogus"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 2 and "unrecognized arguments: --bogus" in started.stderr
