"""composite_demo/interpreter.py (a real Jupyter kernel) and the Code Interpreter mode's turn handling in
composite_demo/main.py, without Streamlit."""

import os
import tempfile
import time

import pytest

from composite_demo import interpreter
from composite_demo.interpreter import Kernel, RunResult, code_of


@pytest.fixture(scope="module")
def kernel():
    k = Kernel()
    yield k
    k.shutdown()


def test_runs_code_and_returns_its_output(kernel):
    result = kernel.run("import sys\nprint('out', 6 * 7)\nprint('err', file=sys.stderr)\nx = 5\nx * 3")
    assert result.text.splitlines() == ["out 42", "err", "15"]
    assert not result.error and not result.timed_out and result.images == []
    assert kernel.run("x + 1").text == "6"  # the kernel keeps its variables between runs
    assert result.observation() == "out 42\nerr\n15"


def test_an_error_returns_the_traceback_without_ansi_codes(kernel):
    result = kernel.run("def f():\n    return 1 / 0\nf()")
    assert result.error
    assert "ZeroDivisionError" in result.text and "return 1 / 0" in result.text
    assert "\x1b" not in result.text
    assert "ZeroDivisionError" in result.observation()


def test_a_plot_comes_back_as_a_png(kernel):
    result = kernel.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('hello')\nplt.show()")
    assert not result.error, result.text
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert "[image]" in result.observation()


def test_output_is_capped_to_its_end(kernel):
    result = kernel.run(f"print('a' * {interpreter.MAX_OUTPUT * 3}, 'the end')")
    assert len(result.text) <= interpreter.MAX_OUTPUT + 10
    assert result.text.endswith("the end") and result.text.startswith("[...]")


def test_an_endless_loop_is_stopped_by_the_time_limit_and_the_kernel_still_works(kernel):
    kernel.run("kept = 'yes'")
    started = time.monotonic()
    result = kernel.run("print('started', flush=True)\nwhile True:\n    pass", timeout=3)
    took = time.monotonic() - started
    assert result.timed_out and 3 <= took < 3 + interpreter.INTERRUPT_GRACE_S
    assert "started" in result.text and "stopped" in result.observation()
    assert kernel.run("1 + 1").text == "2"
    assert kernel.run("kept").text == "'yes'"  # interrupted, not restarted: the variables are still there


def test_interrupt_stops_the_run_in_progress(kernel):
    import threading

    results = []
    code = "open('started', 'w').close()\nwhile True:\n    pass"
    kernel.run("import os\nif os.path.exists('started'): os.remove('started')")
    thread = threading.Thread(target=lambda: results.append(kernel.run(code, timeout=60)))
    started = time.monotonic()
    thread.start()
    flag = os.path.join(kernel.workdir, "started")
    while not os.path.exists(flag) and time.monotonic() - started < 30:  # the loop is running
        time.sleep(0.01)
    assert kernel.running
    kernel.interrupt()
    thread.join(30)
    (result,) = results
    assert result.error and "KeyboardInterrupt" in result.text and not result.timed_out
    assert time.monotonic() - started < 30
    assert not kernel.running and kernel.run("3 * 3").text == "9"
    kernel.interrupt()  # none running: nothing happens
    assert kernel.run("4 * 4").text == "16"


@pytest.mark.slow
def test_a_run_that_ignores_the_interrupt_restarts_the_kernel(kernel):
    pid = kernel.pid
    result = kernel.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
                        timeout=2)
    assert result.timed_out and "restarted" in result.text
    assert kernel.run("1 + 1").text == "2"
    assert kernel.pid != pid


def test_the_kernel_works_in_a_temporary_folder_and_listens_on_localhost_only(kernel):
    cwd = kernel.run("import os\nprint(os.getcwd())").text
    assert cwd == kernel.workdir
    assert os.path.dirname(cwd) == tempfile.gettempdir() and cwd != os.getcwd()
    info = kernel.connection
    assert info["ip"] == "127.0.0.1" and info["transport"] == "tcp"


def test_shutdown_ends_the_kernel_process_and_removes_its_folder():
    k = Kernel()
    pid = int(k.run("import os\nos.getpid()").text)
    folder = k.workdir
    assert pid == k.pid and os.path.isdir(f"/proc/{pid}")
    k.shutdown()
    assert not os.path.exists(f"/proc/{pid}")  # shutdown waits for the process (it is reaped)
    assert not os.path.exists(folder) and not k.alive
    assert k.run("2 + 2").text == "4"  # a run after shutdown starts a new kernel
    k.shutdown()


def test_code_of_takes_the_code_block():
    assert code_of("```python\nprint(1)\n```") == "print(1)"
    assert code_of("```\na = 1\nb = 2\n```") == "a = 1\nb = 2"
    assert code_of("```python\nprint(1)") == "print(1)"  # cut off by the length limit
    assert code_of("no code here") is None


# ---- the page's handling of interpreter turns (composite_demo/main.py) --------------------------------------------
def test_interpreter_segments_become_a_text_turn_and_a_code_turn():
    from composite_demo.main import interpreter_entries

    entries = interpreter_entries(["\nLet me run that.", "interpreter\n```python\nprint(2)\n```"])
    assert entries == [{"role": "assistant", "content": "Let me run that."},
                       {"role": "assistant", "metadata": "interpreter", "content": "```python\nprint(2)\n```",
                        "code": "print(2)"}]
    assert interpreter_entries(["interpreter\n```python\nx\n```"])[0]["code"] == "x"
    assert interpreter_entries(["\nJust text with ```python\nprint(1)\n``` in it."]) is None
    assert interpreter_entries(["calculator\n```python\ntool_call()\n```"]) is None


def test_with_code_execution_off_nothing_is_run():
    from composite_demo.main import run_code

    asked = []
    entry = run_code("open('/tmp/x', 'w')", allowed=False, kernel_for=lambda: asked.append(1), timeout=1)
    assert asked == [] and entry["not_run"] and "not run" in entry["content"]


def test_with_code_execution_on_the_kernel_runs_it():
    from composite_demo.main import run_code

    class FakeKernel:
        def run(self, code, timeout):
            self.ran = (code, timeout)
            return RunResult(text="out", images=[b"png"], timed_out=True)

    fake = FakeKernel()
    entry = run_code("print(1)", allowed=True, kernel_for=lambda: fake, timeout=7)
    assert fake.ran == ("print(1)", 7)
    assert entry["timed_out"] and entry["images"] == [b"png"] and entry["output"] == "out"
    assert entry["content"] == "out\n[image]\n[the run was stopped: it passed its time limit]"


def test_kernels_of_gone_sessions_are_shut_down():
    from composite_demo import main

    class FakeKernel:
        stopped = False

        def shutdown(self):
            self.stopped = True

    here, gone = FakeKernel(), FakeKernel()
    main._kernels.update({"here": here, "gone": gone})
    try:
        main.sweep_kernels(lambda sid: sid == "here")
        assert gone.stopped and not here.stopped
        assert "gone" not in main._kernels and main._kernels["here"] is here
    finally:
        main._kernels.pop("here", None)


def test_a_dropped_session_state_shuts_its_kernel_down():
    import gc

    from composite_demo import main

    holder = main._KernelHolder("session-x")
    kernel = holder.kernel
    pid = int(kernel.run("import os\nos.getpid()").text)
    main._kernels["session-x"] = kernel
    del holder
    gc.collect()
    assert not kernel.alive and "session-x" not in main._kernels
    assert not os.path.exists(f"/proc/{pid}")


def test_regenerate_drops_the_last_answer_and_its_turns():
    from composite_demo.main import drop_last_answer

    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                    {"role": "assistant", "metadata": "interpreter", "content": "x", "code": "x"},
                    {"role": "tool", "name": "interpreter", "content": "1"}, {"role": "assistant", "content": "e"}]
    assert drop_last_answer(conversation)
    assert conversation == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}]
    assert not drop_last_answer([])
