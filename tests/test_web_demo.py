"""web_demo.py (Gradio) in headless Chromium: streamed reply, Stop, Regenerate, Clear, one history per session."""

import os

import pytest

from browser import wait_until
from conftest import ROOT
from serving import ServerProcess

SHOTS = os.path.join(ROOT, "resources")


@pytest.fixture(scope="module")
def web(v3_dir):
    with ServerProcess("web_demo.py", v3_dir, ready_path="/") as server:
        yield server


def bot_texts(page) -> list[str]:
    return page.locator("#chatbot .message.bot").all_inner_texts()


def last_bot(page) -> str | None:
    texts = bot_texts(page)  # read once: the list can change between two reads
    return texts[-1] if texts else None


def user_texts(page) -> list[str]:
    return page.locator("#chatbot .message.user").all_inner_texts()


def set_slider(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url, timeout=60_000)
    page.locator("#user-input textarea").wait_for()
    return page


# Every length the last reply shows, recorded in the page at each change of the chat: polling from here can
# miss the steps of a reply that streams in well under a second.
WATCH_LENGTHS = """() => {
    window.replyLengths = new Set();
    const record = () => {
        const bots = document.querySelectorAll('#chatbot .message.bot');
        if (bots.length) window.replyLengths.add(bots[bots.length - 1].innerText.length);
    };
    new MutationObserver(record).observe(document.querySelector('#chatbot'),
                                         {subtree: true, childList: true, characterData: true});
}"""


def streamed_lengths(page) -> list[int]:
    return sorted(page.evaluate("[...window.replyLengths]"))


def test_chat_streams_regenerates_and_clears(web, browser):
    page = open_page(browser, web.url)
    page.evaluate(WATCH_LENGTHS)
    page.locator("#user-input textarea").fill("你好，请介绍一下你自己")
    page.locator("#submit").click()
    for _attempt in range(4):
        wait_until(page, lambda: last_bot(page) and (len(streamed_lengths(page)) >= 3 or
                                                     page.locator("#chatbot .pending").count() == 0 and _stable(page)),
                   what="a streamed reply (several lengths seen) or its end")
        lengths = streamed_lengths(page)
        if len(lengths) >= 3:
            break
        page.evaluate("window.replyLengths = new Set()")
        # this random model sampled a stop token within a few tokens, before streaming could show: draw again
        short = last_bot(page)
        page.locator("#regenerate").click()
        wait_until(page, lambda: last_bot(page) != short, what="a new reply")
    assert len(lengths) >= 3, f"no reply streamed in several steps: lengths seen {sorted(lengths)}"
    assert user_texts(page)[-1].strip() == "你好，请介绍一下你自己"
    assert page.locator("#user-input textarea").input_value() == ""  # the box is free for the next message
    wait_until(page, lambda: page.locator("#chatbot .pending").count() == 0 and _stable(page), timeout_s=60,
               what="the reply to finish")
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, "web_demo.png"))

    first = bot_texts(page)[-1]
    set_slider(page, "temperature", "0.9")
    page.locator("#regenerate").click()
    wait_until(page, lambda: last_bot(page) not in (None, first), what="a regenerated reply")
    assert len(user_texts(page)) == 1  # regenerate replaces the reply, it does not add a turn

    page.locator("#clear").click()

    wait_until(page, lambda: not bot_texts(page) and not user_texts(page), what="the history to clear")


def _stable(page) -> bool:
    before = bot_texts(page)
    page.wait_for_timeout(700)
    return before == bot_texts(page)


def test_stop_ends_a_long_reply(web, browser):
    page = open_page(browser, web.url)
    set_slider(page, "temperature", "0")  # greedy: this random model then loops and never ends on its own
    page.locator("#user-input textarea").fill("Write a very long story")
    page.locator("#submit").click()
    wait_until(page, lambda: len(last_bot(page) or "") > 40, what="the reply to start")
    growing = len(bot_texts(page)[-1])
    wait_until(page, lambda: len(last_bot(page) or "") > growing, what="the reply to keep growing")
    page.locator("#stop").click()
    page.wait_for_timeout(500)
    stopped = bot_texts(page)[-1]
    page.wait_for_timeout(1500)
    assert bot_texts(page)[-1] == stopped  # nothing more arrives
    page.screenshot(path=os.path.join(SHOTS, "web_demo_stopped.png"))
    page.locator("#user-input textarea").fill("hi")  # and the demo takes the next message
    page.locator("#submit").click()
    wait_until(page, lambda: len(user_texts(page)) == 2 and len(bot_texts(page)) == 2, what="a second reply")
    page.locator("#stop").click()


def test_each_browser_session_has_its_own_history(web, browser):
    a, b = open_page(browser, web.url), open_page(browser, web.url)
    a.locator("#user-input textarea").fill("only in session A")
    a.locator("#submit").click()
    wait_until(a, lambda: bot_texts(a), what="a reply in session A")
    a.locator("#stop").click()
    b.wait_for_timeout(500)
    assert user_texts(b) == [] and bot_texts(b) == []


def test_clear_while_a_reply_streams_leaves_the_chat_empty(web, browser):
    page = open_page(browser, web.url)
    set_slider(page, "temperature", "0")  # greedy: a long reply, so Clear always lands mid-stream
    for round_ in range(4):
        page.locator("#user-input textarea").fill(f"Write a very long story, part {round_}")
        page.locator("#submit").click()
        wait_until(page, lambda: len(last_bot(page) or "") > 20 * (round_ + 1),
                   what="the reply to stream")
        page.locator("#clear").click()
        wait_until(page, lambda: not bot_texts(page) and not user_texts(page), what="the history to clear")
        page.wait_for_timeout(1200)  # late updates of the cancelled reply would show up here
        assert bot_texts(page) == [] and user_texts(page) == []
    for round_ in range(3):  # Clear right after Regenerate
        page.locator("#user-input textarea").fill("hello")
        page.locator("#submit").click()
        wait_until(page, lambda: len(last_bot(page) or "") > 20, what="a reply")
        page.locator("#regenerate").click()
        page.wait_for_timeout(100 * round_)
        page.locator("#clear").click()
        page.wait_for_timeout(1500)
        assert bot_texts(page) == [] and user_texts(page) == []
