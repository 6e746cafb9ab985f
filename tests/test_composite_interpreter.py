"""composite_demo in headless Chromium, continued: the Code Interpreter mode (a scripted ChatGLM3 model writing
interpreter turns, run in a real Jupyter kernel), Regenerate, the direct start (`python composite_demo/main.py`), and
the Tool mode against our openai_api server (--api-base)."""

import os
import re
import uuid

import pytest

from test_composite_demo import SCRIPTED, choose, composite, messages, open_page, wait_messages  # noqa: F401
from test_web_demo2 import HEALTH, send

pytestmark = pytest.mark.browser
CODE = "Code Interpreter"
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def allowed(v3_dir):
    from serving import ServerProcess

    with ServerProcess(SCRIPTED, v3_dir, "--allow-code-execution", "--code-timeout", str(TIMEOUT_S),
                       ready_path=HEALTH, streamlit=True) as server:
        yield server


def test_code_runs_and_its_output_and_a_plot_appear(allowed, browser):
    from browser import screenshot, wait_until
    from scripted_tools import RUN_INTRO, run

    page = open_page(browser, allowed.url, CODE)
    assert page.get_by_text("Code execution is off").count() == 0
    code = ("import math, os\nprint('sum:', sum(range(10)), 'pi:', round(math.pi, 3))\nprint(os.getcwd())\n"
            "import matplotlib.pyplot as plt\nxs = [x / 10 for x in range(63)]\nplt.plot(xs, [math.sin(x) for x in xs])"
            "\nplt.title('sin(x)')\nplt.show()")
    send(page, run(code))
    wait_messages(page, "please run code", f"^{RUN_INTRO}$", r"^Code · interpreter\s+import math, os.*plt\.show\(\)$",
                  r"^Code output · interpreter\s+sum: 45 pi: 3\.142\s+/tmp/chatglm-interpreter-\w+",
                  r"^Observed: sum: 45 pi: 3\.142\s/tmp/chatglm-interpreter-\w+\s\[image\]$")  # markdown: lines joined
    output = page.get_by_test_id("stChatMessage").nth(3)
    image = output.locator("img")
    # the figure is its own element in the bubble, drawn after the bubble's text (seen missing at that moment once)
    wait_until(page, lambda: image.count() == 1, what="the figure in the output bubble")
    size = wait_until(page, lambda: image.evaluate("img => img.complete && [img.naturalWidth, img.naturalHeight]"),
                      what="the figure to load")
    assert size[0] > 100 and size[1] > 100  # a drawn figure, not a broken image
    screenshot(page, "composite_demo_interpreter.png")

    send(page, run("undefined_name + 1"))  # an error's traceback is shown and sent back
    wait_messages(page, *[".+"] * 5, "please run code", RUN_INTRO, "undefined_name",
                  r"^Code error · interpreter.*NameError", r"^Observed: .*NameError: name 'undefined_name'")


def test_an_endless_loop_is_stopped_by_the_time_limit_and_the_next_run_works(allowed, browser):
    from scripted_tools import RUN_INTRO, run

    page = open_page(browser, allowed.url, CODE)
    send(page, run("print('looping', flush=True)\nwhile True:\n    pass"))
    wait_messages(page, "please run code", RUN_INTRO, "while True",
                  r"^Run stopped \(time limit\) · interpreter\s+looping",
                  r"^Observed: looping\s\[the run was stopped: it passed its time limit\]$", timeout_s=60)
    send(page, run("print(6 * 7)"))
    wait_messages(page, *[".+"] * 5, "please run code", RUN_INTRO, r"print\(6 \* 7\)",
                  r"^Code output · interpreter\s+42$", "^Observed: 42$")


def test_nothing_runs_without_allow_code_execution(composite, browser):
    from scripted_tools import RUN_INTRO, run

    marker = f"/tmp/composite-never-ran-{uuid.uuid4().hex}"
    page = open_page(browser, composite.url, CODE)
    notice = page.get_by_test_id("stAlert").inner_text()
    assert "Code execution is off" in notice and "--allow-code-execution" in notice
    send(page, run(f"open({marker!r}, 'w').write('ran')"))
    wait_messages(page, "please run code", RUN_INTRO, "composite-never-ran",
                  r"^Not run · code execution is off \(start with --allow-code-execution\)$")
    assert not os.path.exists(marker)
    assert "Observed" not in "".join(messages(page))  # nothing was sent back to the model either


def test_regenerate_replaces_the_last_answer(allowed, browser):
    from browser import wait_until
    from scripted_tools import RUN_INTRO, run

    page = open_page(browser, allowed.url)  # Chat
    send(page, "hello")
    wait_messages(page, "^hello$", r"^Reply \d+: this is a scripted reply\.$")
    first = messages(page)[1]
    page.get_by_role("button", name="Regenerate").click()
    wait_until(page, lambda: messages(page)[1:] not in ([first], []), what="a new answer")
    wait_messages(page, "^hello$", r"^Reply \d+: this is a scripted reply\.$")
    assert messages(page)[1] != first

    choose(page, CODE)  # the interpreter's turns go too, and the code runs again
    send(page, run("runs = globals().get('runs', 0) + 1\nprint('run', runs)"))
    wait_messages(page, "please run code", RUN_INTRO, "runs", r"Code output · interpreter\s+run 1$",
                  "^Observed: run 1$")
    page.get_by_role("button", name="Regenerate").click()
    wait_messages(page, "please run code", RUN_INTRO, "runs", r"Code output · interpreter\s+run 2$",
                  "^Observed: run 2$")


@pytest.mark.slow
def test_python_starts_streamlit_itself(v3_dir, browser):
    """`python composite_demo/main.py --port P ...` becomes a Streamlit server on 127.0.0.1:P."""
    from serving import ServerProcess

    with ServerProcess("composite_demo/main.py", v3_dir, ready_path=HEALTH) as server:
        page = open_page(browser, server.url)
        sidebar = page.get_by_test_id("stSidebar")
        assert [o.inner_text().strip() for o in sidebar.get_by_test_id("stRadioOption").all()] == [
            "Chat", "Tool", CODE]
        assert page.get_by_test_id("stAlert").count() == 0  # no --host complaint
        choose(page, CODE)
        assert "--allow-code-execution" in page.get_by_test_id("stAlert").inner_text()


def test_tool_mode_over_a_remote_server(v3_dir, browser):
    """--api-base: the page's tool round trip through our OpenAI server, whose model writes ChatGLM3 tool calls."""
    from model import load_model
    from model.service import LocalService
    from scripted_tools import ToolScriptedEngine, call
    from server.openai_app import create_app
    from serving import ServerProcess, ThreadServer

    _, tokenizer = load_model(v3_dir, device="cpu", dtype="float32")
    api = ThreadServer(create_app(LocalService(ToolScriptedEngine(tokenizer))))
    try:
        with ServerProcess("composite_demo/main.py", v3_dir, "--api-base", f"{api.url}/v1", ready_path=HEALTH,
                           streamlit=True) as server:
            page = open_page(browser, server.url)
            sidebar = page.get_by_test_id("stSidebar").inner_text()
            assert "Code Interpreter is offered with a local model only" in sidebar
            choose(page, "Tool")
            send(page, call("convert_unit", {"value": 100, "from_unit": "C", "to_unit": "F"}))
            wait_messages(page, "please call tool", r"Tool call · convert_unit.*\"from_unit\": \"C\"",
                          r"^Tool result · convert_unit\s+100 C = 212 F$", r"^Observed: 100 C = 212 F$")
    finally:
        api.stop()
    assert re.search("212", messages(page)[-1])
