"""web_demo2.py (Streamlit + streamlit-chat) in headless Chromium: streamed reply, bubbles, Stop, Clear."""

import os

import pytest

from browser import wait_until
from conftest import ROOT
from serving import ServerProcess

SHOTS = os.path.join(ROOT, "resources")


@pytest.fixture(scope="module")
def st_demo(v3_dir):
    with ServerProcess("web_demo2.py", v3_dir, ready_path="/_stcore/health", streamlit=True) as server:
        yield server


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url, timeout=60_000)
    page.get_by_test_id("stChatInputTextArea").wait_for(timeout=60_000)
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

    selector = "iframe[title='streamlit_chat.streamlit_chat']"
    texts = []
    for i in range(page.locator(selector).count()):
        try:
            texts.append(page.frame_locator(selector).nth(i).locator("body").inner_text(timeout=2000))
        except Error:  # the page re-ran and this iframe went away or is not loaded yet
            texts.append("")
    return texts


def test_reply_streams_then_shows_as_a_bubble_and_clear_removes_it(st_demo, browser):
    page = open_page(browser, st_demo.url)
    send(page, "你好")
    wait_until(page, lambda: streaming_length(page) > 0 or len(bubble_texts(page)) == 2,
               what="the reply to appear")
    wait_until(page, lambda: len(bubble_texts(page)) == 2 and all(t.strip() for t in bubble_texts(page)),
               timeout_s=90, what="the finished reply in a chat bubble")
    assert bubble_texts(page)[0].strip() == "你好"
    page.wait_for_timeout(500)
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, "web_demo2.png"))
    page.get_by_role("button", name="Clear history").click()
    wait_until(page, lambda: not bubble_texts(page), what="the history to clear")


def test_stop_keeps_what_was_written_and_ends_the_reply(st_demo, browser):
    page = open_page(browser, st_demo.url)
    temperature = page.locator("input[type=range][aria-label=temperature]")
    temperature.focus()
    temperature.press("Home")  # 0: greedy, and this random model then never ends on its own
    wait_until(page, lambda: temperature.input_value() == "0", what="temperature 0")
    page.wait_for_timeout(1000)  # the rerun that takes the new value
    send(page, "Write a very long story")
    wait_until(page, lambda: streaming_length(page) > 100, what="a long reply to be streaming")
    page.get_by_role("button", name="Stop").first.click()
    wait_until(page, lambda: streaming_length(page) == -1 and len(bubble_texts(page)) == 2
               and bubble_texts(page)[1].strip(), timeout_s=30, what="the reply to stop and stay in the history")
    kept = bubble_texts(page)[1]
    assert len(kept.strip()) > 50
    page.wait_for_timeout(1500)
    assert bubble_texts(page)[1] == kept and streaming_length(page) == -1
