"""Every front end is a thin adapter over the completion service: the scripts import no other script, server/
never imports the top-level utils.py, every script's --model default is the same, and the chat front ends reach
the model only through the service (so a RemoteService, which has no engine, serves them as well)."""

import ast
import glob
import importlib
import os

import pytest

from conftest import ROOT

SCRIPTS = ["cli_demo", "web_demo", "web_demo2", "api", "openai_api"]
TOP_LEVEL = ["utils", *SCRIPTS]


def imported_modules(path: str) -> set[str]:
    """The top-level names of every module a file imports (at any depth in its code)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def package_and_script_files() -> list[str]:
    files = [os.path.join(ROOT, f"{name}.py") for name in TOP_LEVEL]
    for package in ("model", "server", "composite_demo"):
        files += sorted(glob.glob(os.path.join(ROOT, package, "*.py")))
    return files


@pytest.mark.parametrize("path", package_and_script_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_script_or_package_module_imports_a_script_or_utils(path):
    """What the scripts share lives in the package; utils.py only keeps load_model_on_gpus (and old names)."""
    own = os.path.splitext(os.path.basename(path))[0]
    wrong = imported_modules(path) & (set(TOP_LEVEL) - {own})
    if os.path.basename(os.path.dirname(path)) != "composite_demo":  # a front end too: nothing imports it
        wrong |= imported_modules(path) & {"composite_demo"}
    if own == "utils":
        wrong -= {"model"}
    assert not wrong, f"{os.path.relpath(path, ROOT)} imports {sorted(wrong)}"


def test_every_script_has_the_same_model_default(monkeypatch):
    from model.__main__ import parser as model_main_parser
    from model.flags import DEFAULT_MODEL

    monkeypatch.delenv("MODEL_PATH", raising=False)
    parsers = {name: importlib.import_module(name).parser() for name in SCRIPTS}
    parsers["python -m model"] = model_main_parser()
    parsers["composite_demo"] = importlib.import_module("composite_demo.main").parser()
    defaults = {name: p.get_default("model") for name, p in parsers.items()}
    assert defaults == dict.fromkeys(defaults, DEFAULT_MODEL)
    monkeypatch.setenv("MODEL_PATH", "/models/mine")
    assert {p.get_default("model") for p in [importlib.import_module(n).parser() for n in SCRIPTS]} == {
        "/models/mine"}


CHAT_FRONT_ENDS = ["cli_demo.py", "web_demo.py", "web_demo2.py", "model/__main__.py", "server/webchat.py",
                   "composite_demo/main.py"]
ENGINE_ONLY = {"engine", "format", "tokenizer", "stats", "submit_all", "stream_chat", "model"}


@pytest.mark.parametrize("path", CHAT_FRONT_ENDS)
def test_chat_front_ends_use_only_the_service(path):
    """No attribute a RemoteService lacks (the engine, its format or tokenizer, the model's chat methods)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and not (node.attr == "format" and isinstance(node.value, (ast.Constant, ast.Name))
                     and (isinstance(node.value, ast.Constant) or node.value.id.isupper()))}  # "..".format()
    assert not used & ENGINE_ONLY, f"{path} uses {sorted(used & ENGINE_ONLY)}"


class ServiceOnly:
    """Only the completion service's interface (as RemoteService has it), answered by another service."""

    def __init__(self, inner):
        self._complete = inner.complete
        self.capabilities, self.model_name = inner.capabilities, "remote-model"
        self.context_length, self.max_queue = inner.context_length, inner.max_queue

    def complete(self, messages, settings):
        return self._complete(messages, settings)

    def close(self):
        pass


def test_web_demo_builds_and_replies_over_a_service_without_an_engine(v3_dir):
    from model import load_model
    from model.service import LocalService
    from scripted_demo import ScriptedEngine, say
    from server.webchat import reply_stream
    import web_demo

    service = ServiceOnly(LocalService(ScriptedEngine(load_model(v3_dir, device="cpu", dtype="float32")[1])))
    demo = web_demo.create_demo(service)
    assert "remote-model" in demo.title
    started = []
    *_, reply = reply_stream(service, [{"role": "user", "content": say("over the service")}], "be brief", 8192,
                             0.8, 0.95, on_start=started.append)
    assert reply == "over the service" and len(started) == 1


# ---- --api-base: the client scripts' remote service -----------------------------------------------------------
class FakeRemote:
    def __init__(self, api_base, api_key=None, model=None, timeout=600.0):
        self.args = (api_base, api_key, model)


@pytest.mark.parametrize("script", ["cli_demo", "web_demo", "web_demo2", "model.__main__"])
def test_api_base_gives_a_remote_service_without_loading_a_model(script, monkeypatch):
    import sys
    import types

    from model import flags

    monkeypatch.setitem(sys.modules, "model.remote", types.SimpleNamespace(RemoteService=FakeRemote))
    monkeypatch.setattr(flags, "load_from_args", lambda args: pytest.fail("no model may be loaded"))
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    argv = ["--api-base", "http://gpu-box:8000/v1", "--model-name", "chatglm3-6b"]
    args = importlib.import_module(script).parser().parse_args(argv + (["hi"] if script == "model.__main__" else []))
    assert flags.service_from_args(args).args == ("http://gpu-box:8000/v1", "from-env", "chatglm3-6b")
    args = importlib.import_module(script).parser().parse_args(
        argv + ["--api-key", "given"] + (["hi"] if script == "model.__main__" else []))
    assert flags.service_from_args(args).args[1] == "given"


def test_servers_keep_api_key_as_the_key_they_require(monkeypatch):
    monkeypatch.setenv("API_KEY", "required")
    monkeypatch.setenv("OPENAI_API_KEY", "sent")
    for script in ("api", "openai_api"):
        args = importlib.import_module(script).parser().parse_args([])
        assert args.api_key == "required" and not hasattr(args, "api_base")
    assert importlib.import_module("cli_demo").parser().parse_args([]).api_key == "sent"


def test_python_m_model_ctrl_c_cancels_the_completion(monkeypatch, capsys):
    """One-shot: Ctrl-C while the reply streams cancels the completion and ends with status 130."""
    import model.__main__ as one_shot
    from model.service import Capabilities, Completion, ReplyPart

    cancelled = []

    class Interrupted(Completion):
        def cancel(self):
            cancelled.append(True)

        def __iter__(self):
            yield ReplyPart(content="半句")
            raise KeyboardInterrupt

    class Service:
        capabilities = Capabilities()

        def complete(self, messages, settings):
            assert messages[-1].content == "你好" and settings.max_tokens == one_shot.ONE_SHOT_TOKENS
            return Interrupted()

        def close(self):
            pass

    monkeypatch.setattr(one_shot, "service_or_exit", lambda args: Service())
    assert one_shot.main(["你好"]) == 130
    assert cancelled and capsys.readouterr().out.startswith("半句")
