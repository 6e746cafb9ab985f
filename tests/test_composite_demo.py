"""composite_demo: the tool registry and the shipped tools (fast), and the page in headless Chromium with a scripted
engine that calls tools (tests/scripted_tools.py): the tool round trip, a tool's error, Chat, and ChatGLM2."""

import json
import re
import typing

import pytest

from composite_demo import tools
from composite_demo.tools import ToolError, describe, run
from test_web_demo2 import HEALTH, send
from test_web_demo2 import open_page as open_web_demo2_page


# ---- the registry -----------------------------------------------------------------------------------------------
def test_a_typed_documented_function_becomes_a_chatglm3_tool():
    def book(city: str, nights: int, budget: float = 100.0, breakfast: bool = False,
             kind: typing.Literal["hotel", "hostel"] = "hotel") -> str:
        """Book a room.

        Pays at the desk.

        Note: not refundable.

        city: where
        nights: how many nights
        """
        return f"{city} {nights} {budget} {breakfast} {kind}"

    assert describe(book) == {
        "name": "book", "description": "Book a room.\nPays at the desk.\nNote: not refundable.",
        "parameters": {"type": "object", "required": ["city", "nights"], "properties": {
            "city": {"type": "string", "description": "where"},
            "nights": {"type": "integer", "description": "how many nights"},
            "budget": {"type": "number"}, "breakfast": {"type": "boolean"},
            "kind": {"type": "string", "enum": ["hotel", "hostel"]}}}}
    registry = {"book": book}
    assert run("book", '{"city": "Rome", "nights": 2, "budget": 80}', registry) == "Rome 2 80.0 False hotel"
    for bad, why in [('{"city": "Rome"}', "nights"), ('{"city": 1, "nights": 2}', "city must be of type string"),
                     ('{"city": "R", "nights": true}', "nights must be of type integer"),
                     ('{"city": "R", "nights": 1, "kind": "tent"}', "kind must be one of"),
                     ('{"city": "R", "nights": 1, "pool": 1}', "pool"), ("[1]", "JSON object"), ("{", "not JSON")]:
        with pytest.raises(ToolError, match=why):
            run("book", bad, registry)
    with pytest.raises(ToolError, match="there is no tool 'nope'"):
        run("nope", "{}", registry)


def test_a_tool_without_docstring_or_hint_is_refused_when_declared():
    def undocumented(x: int) -> int:
        return x

    def untyped(x):
        """Something."""

    with pytest.raises(TypeError, match="docstring"):
        tools.tool(undocumented)
    with pytest.raises(TypeError, match="type hint"):
        tools.tool(untyped)

    def anything(**kwargs: int) -> int:
        """Something."""

    with pytest.raises(TypeError, match="plain keyword parameter"):
        tools.tool(anything)
    assert not {"undocumented", "untyped", "anything"} & set(tools.REGISTRY)


def test_shipped_tools_are_registered_with_their_descriptions():
    assert {"calculator", "get_time", "random_number", "convert_unit"} <= set(tools.REGISTRY)
    for fn in tools.REGISTRY.values():
        assert fn.tool_description == describe(fn) and fn.tool_description["description"]


def calc(expression: str) -> str:
    return run("calculator", json.dumps({"expression": expression}))


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("-2 ** 2", "-4"), ("7 // 2", "3"), ("7 % 3", "1"), ("7 / 2", "3.5"),
    ("2 ** 10", "1024"), ("sqrt(16) + abs(-1)", "5.0"), ("round(pi, 2)", "3.14"), ("-(-3)", "3")])
def test_calculator_computes(expression, value):
    assert calc(expression) == value


@pytest.mark.parametrize("expression, why", [
    ("__import__('os').system('true')", "not"), ("(1).real", "not"), ("().__class__", "not"), ("x", "not"),
    ("'a' * 3", "not"), ("[1, 2]", "not"), ("lambda: 1", "not"), ("open('/etc/passwd')", "not"),
    ("9 ** 9 ** 9", "exponents above"), ("2 ** 100000", "exponents above"),
    ("(10 ** 999) * (10 ** 999) * (10 ** 999) * (10 ** 999) * (10 ** 999)", "digits"),
    ("1 / 0", "division by zero"), ("sqrt(-1)", "sqrt"), ("1 +", "not an arithmetic expression"),
    ("1e308 * 1e308 ** 2", "too large"), ("1" * 600, "longer than")])
def test_calculator_refuses(expression, why):
    with pytest.raises(ToolError, match=why):
        calc(expression)


@pytest.mark.parametrize("arguments, result", [
    ((100, "C", "F"), "100 C = 212 F"), ((32, "F", "C"), "32 F = 0 C"), ((0, "K", "C"), "0 K = -273.15 C"),
    ((1, "mi", "km"), "1 mi = 1.60934 km"), ((12, "in", "ft"), "12 in = 1 ft"), ((1, "kg", "lb"), "1 kg = 2.20462 lb"),
    ((500, "g", "kg"), "500 g = 0.5 kg")])
def test_unit_conversion(arguments, result):
    assert run("convert_unit", json.dumps(dict(zip(["value", "from_unit", "to_unit"], arguments)))) == result


@pytest.mark.parametrize("arguments, why", [((1, "kg", "m"), "cannot convert"), ((-500, "C", "K"), "absolute zero"),
                                            ((1, "parsec", "m"), "cannot convert")])
def test_unit_conversion_refuses(arguments, why):
    with pytest.raises(ToolError, match=why):
        run("convert_unit", json.dumps(dict(zip(["value", "from_unit", "to_unit"], arguments))))


def test_time_in_a_time_zone():
    from datetime import datetime, timedelta, timezone

    shown = run("get_time", '{"timezone": "Asia/Shanghai"}')
    assert shown.endswith("CST (UTC+0800)")
    moment = datetime.strptime(shown[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone(timedelta(hours=8)))
    assert abs((moment - datetime.now(timezone.utc)).total_seconds()) < 60
    assert run("get_time", "{}").endswith("UTC (UTC+0000)")
    for bad in ("Mars/Olympus", "../../etc/passwd", ""):
        with pytest.raises(ToolError, match="unknown time zone"):
            run("get_time", json.dumps({"timezone": bad}))


def test_random_number_stays_in_its_range():
    assert {int(run("random_number", '{"low": 1, "high": 3}')) for _ in range(200)} == {1, 2, 3}
    with pytest.raises(ToolError, match="above high"):
        run("random_number", '{"low": 5, "high": 1}')


# ---- the page in Chromium ---------------------------------------------------------------------------------------
SCRIPTED = "tests/scripted_tools.py"


@pytest.fixture(scope="module")
def composite(v3_dir):
    from serving import ServerProcess

    with ServerProcess(SCRIPTED, v3_dir, ready_path=HEALTH, streamlit=True) as server:
        yield server


def open_page(browser, url, mode=None):
    page = open_web_demo2_page(browser, url)  # the same Streamlit chat input
    page.set_viewport_size({"width": 1280, "height": 1000})
    if mode:
        choose(page, mode)
    return page


def choose(page, mode):
    page.get_by_test_id("stSidebar").get_by_text(mode, exact=True).click()
    page.wait_for_function("m => [...document.querySelectorAll('[data-testid=stRadioOption][data-selected=true]')]"
                           ".some(o => o.innerText.trim() === m)", arg=mode, timeout=10_000)
    wait_idle(page)


def wait_idle(page):
    from browser import wait_until

    wait_until(page, lambda: page.get_by_test_id("stStatusWidget").count() == 0, what="the page to be idle")


def messages(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('[data-testid=stChatMessage]')]"
                         ".map(m => (m.querySelector('[data-testid=stChatMessageContent]') || m).innerText.trim())")


def wait_messages(page, *patterns, timeout_s=60):
    """Until the chat messages match patterns (regular expressions, searched), one each, and the page is idle."""
    from browser import wait_until

    def done():
        shown = messages(page)
        running = page.get_by_test_id("stStatusWidget").count() > 0
        return (not running and len(shown) == len(patterns)
                and all(re.search(p, s, re.S) for p, s in zip(patterns, shown)))
    try:
        wait_until(page, done, timeout_s=timeout_s, what=f"the messages {patterns}")
    except AssertionError:
        raise AssertionError(f"messages {messages(page)} do not match {patterns}") from None


@pytest.mark.browser
def test_tool_call_round_trip(composite, browser):
    """The call (name, arguments) and its result are shown, and the model's next turn received the result."""
    from browser import screenshot
    from scripted_tools import call

    page = open_page(browser, composite.url, "Tool")
    send(page, call("calculator", {"expression": "2 * (3 + 4) ** 2"}))
    wait_messages(page, "please call tool", r"Tool call · calculator.*\"expression\": \"2 \* \(3 \+ 4\) \*\* 2\"",
                  r"Tool result · calculator\s+98$", "^Observed: 98$")
    send(page, call("get_time", {"timezone": "Asia/Shanghai"}))
    wait_messages(page, "calculator", "calculator", "98", "98", "get_time",
                  r"Tool call · get_time.*Asia/Shanghai", r"Tool result · get_time\s+\d{4}-\d\d-\d\d .*CST",
                  r"^Observed: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d CST \(UTC\+0800\)$")
    screenshot(page, "composite_demo_tool.png")


@pytest.mark.browser
def test_a_tool_error_is_shown_and_sent_back(composite, browser):
    from scripted_tools import call

    page = open_page(browser, composite.url, "Tool")
    send(page, call("calculator", {"expression": "__import__('os').system('touch /tmp/pwned')"}))
    wait_messages(page, "please call tool", r"Tool call · calculator.*__import__",
                  r"Tool error · calculator\s+ToolError: only numbers", r"^Observed: ToolError: only numbers")
    send(page, call("nonexistent_tool", {}))  # a tool the demo never offered: what the model wrote, not a call
    wait_messages(page, *[".+"] * 4, "nonexistent_tool", r"^tool_call\(\)$")


@pytest.mark.browser
def test_a_model_that_keeps_calling_tools_is_stopped_after_max_rounds(composite, browser):
    from composite_demo.main import MAX_ROUNDS
    from scripted_tools import call

    page = open_page(browser, composite.url, "Tool")
    send(page, call("random_number", {"low": 1, "high": 6}, again=True))
    wait_messages(page, "please call tool", *[r"Tool call · random_number", r"Tool result · random_number\s+[1-6]$"]
                  * MAX_ROUNDS)
    assert f"called tools {MAX_ROUNDS} times in a row" in page.get_by_test_id("stAlert").inner_text()


@pytest.mark.browser
@pytest.mark.parametrize("mode", ["Chat", "Tool"])
def test_stop_keeps_what_was_written_and_the_chat_goes_on(composite, browser, mode):
    from browser import wait_until
    from scripted_demo import LONG, say

    page = open_page(browser, composite.url, mode)
    send(page, LONG)
    wait_until(page, lambda: page.get_by_text(re.compile("word40 ")).count() > 0, what="a long reply to stream")
    page.get_by_role("button", name="Stop").click()
    wait_messages(page, LONG, "^word0 word1 .*word40 ")
    kept = messages(page)[1]
    send(page, say("next"))
    wait_messages(page, LONG, "^word0", "next", "^next$")
    assert messages(page)[1] == kept


@pytest.mark.browser
def test_chat_mode_renders_markdown_safely_and_keeps_each_modes_conversation(composite, browser):
    from browser import screenshot
    from scripted_demo import say

    page = open_page(browser, composite.url)
    page.evaluate("() => { window.ran = false; }")
    send(page, say("**bold** and <img src=x onerror=\"window.ran=true\"> $x^2$"))
    wait_messages(page, "please say", r"^bold and <img src=x onerror=.*")
    reply = page.get_by_test_id("stChatMessage").nth(1)
    assert reply.locator("strong").inner_text() == "bold"
    assert reply.locator("img").count() == 0 and page.evaluate("window.ran") is False
    assert reply.locator(".katex").count() == 1
    send(page, "hello")
    wait_messages(page, "please say", "bold", "^hello$", r"^Reply \d+: this is a scripted reply\.$")
    screenshot(page, "composite_demo_chat.png")
    choose(page, "Tool")  # its own conversation: empty
    wait_messages(page)
    choose(page, "Chat")
    wait_messages(page, "please say", "bold", "^hello$", "^Reply")
    page.get_by_role("button", name="Clear history").click()
    wait_messages(page)


@pytest.mark.browser
def test_a_chatglm2_checkpoint_offers_only_chat(browser):
    from conftest import model_dir
    from serving import ServerProcess

    with ServerProcess(SCRIPTED, model_dir("chatglm2-tiny"), ready_path=HEALTH, streamlit=True) as server:
        page = open_page(browser, server.url)
        sidebar = page.get_by_test_id("stSidebar")
        assert sidebar.locator("input[type=radio]").count() == 1
        assert "calling tools needs a ChatGLM3 checkpoint" in sidebar.inner_text()
        assert "ChatGLM2-6B" in sidebar.inner_text()
        send(page, "hello")
        wait_messages(page, "^hello$", r"^Reply \d+: this is a scripted reply\.$")


@pytest.mark.browser
def test_streamlit_run_with_the_model_and_host_check(v3_dir, browser):
    """The page as users start it (the real tiny model); it refuses to serve where Streamlit listens elsewhere than
    --host."""
    from serving import ServerProcess

    script = "composite_demo/main.py"
    with ServerProcess(script, v3_dir, ready_path=HEALTH, streamlit=True) as server:
        page = open_page(browser, server.url, "Tool")
        send(page, "hello")
        from browser import wait_until

        # the random tiny model samples its reply: whatever it is, it may also be empty (a stop token first)
        wait_until(page, lambda: page.get_by_test_id("stStatusWidget").count() == 0
                   and messages(page)[:1] == ["hello"] and len(messages(page)) <= 2, timeout_s=60,
                   what="the message and the model's reply")
    with ServerProcess(script, v3_dir, "--host", "0.0.0.0", ready_path=HEALTH, streamlit=True) as server:
        page = browser.new_page()
        page.goto(server.url, timeout=60_000)
        page.get_by_test_id("stAlert").wait_for(timeout=60_000)
        assert "--host is 0.0.0.0" in page.get_by_test_id("stAlert").inner_text()
        assert page.get_by_test_id("stChatInputTextArea").count() == 0
