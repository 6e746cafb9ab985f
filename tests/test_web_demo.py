"""web_demo.py (Gradio) in headless Chromium, replying through a scripted engine (tests/scripted_demo.py):
streamed reply, Stop, Regenerate, Clear, one history per session, script in messages, errors, login, uploads."""

import http.server
import re
import threading

import httpx
import pytest

from browser import DANGER, PAYLOAD_TEXT, WATCH_DANGER, click_links, screenshot, wait_until
from scripted_demo import FAIL, LONG, closing_cancels, say
from serving import ServerProcess

pytestmark = pytest.mark.browser
SCRIPTED = "tests/scripted_demo.py"
LOGIN = ("ada", "s3cret:pass")


@pytest.fixture(scope="module")
def web(v3_dir):
    with ServerProcess(SCRIPTED, v3_dir, ready_path="/") as server:
        yield server


def bot_texts(page) -> list[str]:
    return page.locator("#chatbot .message.bot").all_inner_texts()


def last_bot(page) -> str | None:
    texts = bot_texts(page)  # read once: the list can change between two reads
    return texts[-1] if texts else None


def user_texts(page) -> list[str]:
    return [t.strip() for t in page.locator("#chatbot .message.user").all_inner_texts()]


def set_slider(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url, timeout=60_000)
    page.locator("#user-input textarea").wait_for()
    # Gradio can render the input box before the chat: the watcher needs the chat element itself.
    page.locator("#chatbot").wait_for(state="attached")
    page.evaluate(WATCH_CHAT)
    return page


def send(page, text: str) -> None:
    page.locator("#user-input textarea").fill(text)
    page.locator("#submit").click()


def wait_idle(page, timeout_s: float = 30) -> None:
    """Until no reply is pending (Gradio marks the chat while an event streams into it)."""
    wait_until(page, lambda: page.locator("#chatbot .pending, #chatbot .generating").count() == 0,
               timeout_s=timeout_s, what="the reply to end")


def wait_reply(page, pattern: str, timeout_s: float = 30) -> str:
    """The last reply, once it matches pattern (a regular expression, searched)."""
    return wait_until(page, lambda: re.search(pattern, last_bot(page) or "") and last_bot(page), timeout_s=timeout_s,
                      what=f"a reply matching {pattern!r}")


# Every state of the chat (user messages, length of each reply), recorded in the page at each change: polling
# from here can miss the steps of a reply that streams in well under a second, or a late update.
WATCH_CHAT = """() => {
    window.chatLog = [];
    const record = () => {
        const texts = sel => [...document.querySelectorAll('#chatbot ' + sel)].map(e => e.innerText.trim());
        window.chatLog.push({users: texts('.message.user'), bots: texts('.message.bot').map(t => t.length)});
    };
    new MutationObserver(record).observe(document.querySelector('#chatbot'),
                                         {subtree: true, childList: true, characterData: true});
}"""


def chat_log(page) -> list[dict]:
    return page.evaluate("window.chatLog")


def test_chat_streams_regenerates_and_clears(web, browser):
    page = open_page(browser, web.url)
    send(page, "你好，请介绍一下你自己")
    first = wait_reply(page, r"^Reply \d+: this is a scripted reply\.$")
    lengths = {s["bots"][-1] for s in chat_log(page) if s["bots"]}
    assert len(lengths) >= 3, f"the reply did not stream in several steps: lengths seen {sorted(lengths)}"
    assert user_texts(page) == ["你好，请介绍一下你自己"]
    assert page.locator("#user-input textarea").input_value() == ""  # the box is free for the next message
    wait_idle(page)
    screenshot(page, "web_demo.png")

    page.locator("#regenerate").click()
    wait_reply(page, rf"^(?!{re.escape(first)}$)Reply \d+: this is a scripted reply\.$")
    # regenerate replaces the reply, it does not add a turn
    assert user_texts(page) == ["你好，请介绍一下你自己"]
    assert len(bot_texts(page)) == 1

    page.locator("#clear").click()
    wait_until(page, lambda: not bot_texts(page) and not user_texts(page), what="the history to clear")


def test_closing_the_tab_stops_its_reply(web, browser):
    """Nobody reads a reply whose page was closed: the demo stops it (freeing its row of the batch) rather
    than let it run to the length limit."""
    page = open_page(browser, web.url)
    send(page, f"{LONG}, then close the tab")
    wait_until(page, lambda: len(last_bot(page) or "") > 40, what="the reply to start")
    assert closing_cancels(page, web), "the closed tab's reply was still being written 20 s later"


def test_stop_ends_a_long_reply(web, browser):
    page = open_page(browser, web.url)
    send(page, LONG)
    wait_until(page, lambda: len(last_bot(page) or "") > 40, what="the reply to start")
    growing = len(bot_texts(page)[-1])
    wait_until(page, lambda: len(last_bot(page) or "") > growing, what="the reply to keep growing")
    page.locator("#stop").click()
    wait_idle(page)
    screenshot(page, "web_demo_stopped.png")
    send(page, say("next one"))  # the demo takes the next message ...
    wait_until(page, lambda: bot_texts(page)[-1:] == ["next one"] and len(bot_texts(page)) == 2, what="a second reply")
    # ... and from the moment that message showed, the stopped reply never changed (its updates would have come
    # before the second reply's on the same ordered stream).
    after = [s["bots"][0] for s in chat_log(page) if len(s["users"]) == 2]
    assert len(set(after)) == 1, f"the stopped reply still grew: lengths {sorted(set(after))}"
    assert all(len(s["users"]) == 2 for s in chat_log(page)[next(i for i, s in enumerate(chat_log(page))
                                                                 if len(s["users"]) == 2):])


def test_each_browser_session_has_its_own_history(web, browser):
    a, b = open_page(browser, web.url), open_page(browser, web.url)
    send(a, say("only in session A"))
    wait_reply(a, "^only in session A$")
    send(b, say("only in session B"))
    wait_reply(b, "^only in session B$")
    wait_idle(a), wait_idle(b)
    assert user_texts(a) == [say("only in session A")] and bot_texts(a) == ["only in session A"]
    assert user_texts(b) == [say("only in session B")] and bot_texts(b) == ["only in session B"]


def _users_after_clear(page, mark: int) -> set[str]:
    """User messages shown after the chat first emptied (from chat-log entry mark on)."""
    log = chat_log(page)[mark:]
    start = next(i for i, s in enumerate(log) if not s["users"] and not s["bots"])
    return {u for s in log[start:] for u in s["users"] if u}  # "": a message being drawn


def test_clear_while_a_reply_streams_leaves_the_chat_empty(web, browser):
    page = open_page(browser, web.url)
    empty = lambda: not bot_texts(page) and not user_texts(page)  # noqa: E731
    for round_, regenerate_first in enumerate([False, False, False, True, True]):  # also Clear right after Regenerate
        send(page, f"{LONG}, part {round_}")
        wait_until(page, lambda: len(last_bot(page) or "") > 20, what="the reply to stream")
        mark = len(chat_log(page))
        if regenerate_first:
            page.locator("#regenerate").click()
        page.locator("#clear").click()
        wait_until(page, empty, what="the history to clear")
        # A late update of the cancelled reply would bring the old message back before this one's reply.
        send(page, say(f"after clear {round_}"))
        wait_reply(page, f"^after clear {round_}$")
        assert _users_after_clear(page, mark) == {say(f"after clear {round_}")}
        page.locator("#clear").click()
        wait_until(page, empty, what="the history to clear")


@pytest.mark.parametrize("who", ["user", "model"])
def test_script_in_a_message_or_reply_never_runs(web, browser, who):
    """HTML in the user's message or the model's reply (while it streams and once done) runs nothing."""
    page = open_page(browser, web.url)
    page.evaluate(WATCH_DANGER, "#chatbot")
    title = page.title()
    send(page, f"{PAYLOAD_TEXT} {say('done')}" if who == "user" else say(PAYLOAD_TEXT))
    wait_reply(page, "^done$" if who == "user" else r"end\.$")  # the whole reply is in
    wait_idle(page)
    click_links(page.locator("#chatbot"), "click me")
    assert page.evaluate("window.danger") == [], "something able to run script was in the chat while it streamed"
    assert page.evaluate(DANGER, "#chatbot") == []
    assert page.title() == title != "PWNED"
    assert "Watch:" in user_texts(page)[0] and (who == "user" or "Watch:" in last_bot(page))


PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00"
         b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def test_a_reply_cannot_make_the_page_load_an_image_from_elsewhere(web, browser):
    """An image in a reply's markdown is loaded from wherever it points: a reply (or a text the model was given
    to read) could carry anything to any server in the address. The page allows images from its own origin
    only; a server on another local port stands for the other server, and a fetch from the page shows that it
    was reachable."""
    hits = []

    class Pixel(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()
            self.wfile.write(PIXEL)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pixel)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        page = open_page(browser, web.url)
        address = f"http://127.0.0.1:{other.server_port}"
        send(page, say(f"look ![pixel]({address}/image?chat=secret) done"))
        wait_reply(page, "done$")
        wait_idle(page)
        image = page.locator("#chatbot .message.bot img")
        wait_until(page, lambda: image.count() == 1, what="the reply's image element")
        assert image.get_attribute("src").startswith(address)
        page.wait_for_timeout(1500)
        assert hits == [], "the page loaded the reply's image from another server"
        page.evaluate("url => fetch(url, {mode: 'no-cors'}).catch(() => null)", f"{address}/fetch")
        wait_until(page, lambda: hits == ["/fetch"], timeout_s=10, what="the other server to be reachable")
    finally:
        other.shutdown()
        other.server_close()


def test_surrogate_in_a_message_is_answered(web, browser):
    page = open_page(browser, web.url)
    # typed in the page: Python cannot hand Playwright a lone surrogate (it is no UTF-8)
    page.locator("#user-input textarea").evaluate("(box, text) => { box.value = text.replace('?', '\\ud800');"
                                                  " box.dispatchEvent(new Event('input', {bubbles: true})); }",
                                                  say("a?b"))
    page.locator("#submit").click()
    wait_reply(page, "^a.b$")


def test_an_error_shows_once_and_gives_the_message_back(v3_dir, browser):
    with ServerProcess(SCRIPTED, v3_dir, ready_path="/") as server:
        page = open_page(browser, server.url)
        send(page, FAIL)
        page.get_by_text("the scripted engine failed").first.wait_for()
        # the unanswered message is back in the box, not left in the chat to merge with the next one
        wait_until(page, lambda: page.locator("#user-input textarea").input_value() == FAIL and not user_texts(page),
                   what="the message back in the box")
        send(page, say("fine now"))
        wait_reply(page, "^fine now$")
        assert user_texts(page) == [say("fine now")]
        set_slider(page, "max-length", "5")  # a conversation over the maximum length: a ValueError
        send(page, "hello")
        page.get_by_text("raise Maximum length").first.wait_for()
        assert page.get_by_label("Maximum length").first.is_visible()  # the control the error names
    log = server.output()
    assert log.count("Traceback") == 1, log  # the engine error, once; the too long conversation none
    assert "share=True" not in log and "--share" in log


def test_login_and_uploads(v3_dir, browser):
    with ServerProcess(SCRIPTED, v3_dir, "--auth", ":".join(LOGIN), ready_path="/") as server:
        refused = httpx.get(f"{server.url}/config", timeout=30)
        assert refused.status_code in (401, 403)
        upload = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("a.txt", b"x" * 100)}, timeout=30)
        assert upload.status_code in (401, 403), upload.text  # no login: no upload
        page = browser.new_page()
        page.goto(server.url, timeout=60_000)
        assert page.locator("#user-input textarea").count() == 0
        page.get_by_label("username").fill(LOGIN[0])
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials").wait_for()
        page.get_by_label("username").fill(LOGIN[0])
        page.get_by_label("password").fill(LOGIN[1])
        page.get_by_role("button", name="Login").click()
        page.locator("#user-input textarea").wait_for()
        send(page, say("logged in"))
        wait_reply(page, "^logged in$")
        # even logged in, the upload route takes nothing (the demo has no file input)
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        upload = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("a.txt", b"x" * 100)},
                            cookies=cookies, timeout=30)
        assert upload.status_code == 413, upload.text


def test_uploads_are_refused_without_login_too(web):
    upload = httpx.post(f"{web.url}/gradio_api/upload", files={"files": ("a.txt", b"x" * 100)}, timeout=30)
    assert upload.status_code == 413, upload.text



def test_a_reply_asked_for_before_stop_or_clear_never_starts_after_them(v3_dir):
    """Regenerate then Clear at once: when the reply's queued event only starts after Clear (a busy server), it
    must not put the conversation back. Each click carries the page's time; Stop / Clear win over earlier asks."""
    from types import SimpleNamespace

    import web_demo
    from model import load_model
    from model.service import LocalService
    from scripted_demo import ScriptedEngine

    engine = ScriptedEngine(load_model(v3_dir, device="cpu", dtype="float32")[1])
    submitted = []
    submit = engine.submit
    engine.submit = lambda request, loop=None: submitted.append(request) or submit(request, loop)
    demo = web_demo.create_demo(LocalService(engine))
    fns = {f.name: f.fn for f in demo.fns.values() if f.name in ("bot", "regenerate", "cancel_reply")}
    session = SimpleNamespace(session_hash="s1")
    history = [{"role": "user", "content": say("hello")}, {"role": "assistant", "content": "hello"}]
    fns["cancel_reply"](2000.5, session)  # Clear clicked at 2000.5 ms ...
    assert list(fns["regenerate"](history, "", 8192, 0.8, 0.8, 2000.4, session)) == []  # ... after this ask
    assert list(fns["bot"](history[:1], "", 8192, 0.8, 0.8, 1999.0, session)) == []
    assert submitted == []  # nothing was generated for them
    other = SimpleNamespace(session_hash="s2")  # another browser's Clear does not matter
    *_, (chat, _) = fns["regenerate"](history, "", 8192, 0.8, 0.8, 2000.4, other)
    assert chat[-1] == {"role": "assistant", "content": "hello"} and len(submitted) == 1
    *_, (chat, _) = fns["regenerate"](history, "", 8192, 0.8, 0.8, 2000.6, session)  # asked after the Clear
    assert chat[-1] == {"role": "assistant", "content": "hello"} and len(submitted) == 2


def test_a_closed_tab_leaves_nothing_behind(v3_dir):
    """When a tab closes, the demo forgets its session: the time of its last Stop / Clear is dropped (one entry
    per visitor would pile up in a long-running demo) and a reply still being written for it is ended."""
    from types import SimpleNamespace

    import web_demo
    from model import load_model
    from model.service import LocalService
    from scripted_demo import ScriptedEngine

    engine = ScriptedEngine(load_model(v3_dir, device="cpu", dtype="float32")[1])
    handles = []
    submit = engine.submit
    engine.submit = lambda request, loop=None: handles.append(submit(request, loop)) or handles[-1]
    demo = web_demo.create_demo(LocalService(engine))
    fns = {f.name: f.fn for f in demo.fns.values() if f.name in ("bot", "cancel_reply", "forget_session")}
    session = SimpleNamespace(session_hash="s1")
    fns["cancel_reply"](2000.5, session)
    assert list(fns["bot"]([{"role": "user", "content": "hi"}], "", 8192, 0.8, 0.8, 1999.0, session)) == []
    fns["forget_session"](session)  # the Clear's time is gone with the session
    assert list(fns["bot"]([{"role": "user", "content": say("again")}], "", 8192, 0.8, 0.8, 1999.0, session))
    stream = fns["bot"]([{"role": "user", "content": LONG}], "", 8192, 0.8, 0.8, 3000.0, session)
    next(stream)  # the long reply is being written ...
    fns["forget_session"](session)  # ... when the tab closes
    assert handles[-1].cancelled
    assert list(stream) == []  # and the page gets nothing more
