"""The web demos' text handling without a browser: lone surrogates, and web_demo2's markdown / LaTeX to HTML."""

import pytest

from browser import PAYLOADS
from scripted_demo import ScriptedEngine, say


@pytest.mark.parametrize("where", ["message", "system"])
def test_reply_stream_answers_text_with_a_lone_surrogate(v3_dir, where):
    """Both demos' reply function (a browser can send such text; UTF-8 cannot hold it)."""
    from model import load_model
    from model.service import LocalService
    from server.webchat import reply_stream

    service = LocalService(ScriptedEngine(load_model(v3_dir, device="cpu", dtype="float32")[1]))
    history = [{"role": "user", "content": say("a\ud800b") if where == "message" else say("ok")}]
    system = "be \ud800 brief" if where == "system" else ""
    *_, reply = reply_stream(service, history, system, 8192, 0.8, 0.95)
    assert reply == ("a\ufffdb" if where == "message" else "ok")


MORE = ["$\\text{<img src=x onerror=alert(1)>}$", "$\\href{javascript:alert(1)}{x}$", "[a](JaVa\tScRiPt:alert(1))",
        "[b](&#106;avascript:alert(1))", "![c](javascript:alert(1))", "[d](data:text/html,<script>alert(1)</script>)"]


@pytest.mark.parametrize("payload", PAYLOADS + MORE)
def test_to_html_shows_html_as_text_and_disarms_links(payload):
    from html.parser import HTMLParser

    from web_demo2 import to_html

    tags = []
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: tags.append((tag, dict(attrs)))
    parser.feed(to_html(f"before {payload} after"))
    for tag, attrs in tags:
        assert tag not in {"script", "iframe", "svg", "object", "embed", "frame"}, tags
        assert not any(name.startswith("on") or name == "srcdoc" for name in attrs), tags
        for name in ("href", "src"):
            assert attrs.get(name, "https:").lower().startswith(("https:", "http:", "mailto:")), tags


@pytest.mark.parametrize("text, needles", [
    ("**bold** and _it_", ["<strong>bold</strong>", "<em>it</em>"]),
    ("`<b>` and\n\n```python\nx = '<i>'\n```", ["<code>&lt;b&gt;</code>", "x = '&lt;i&gt;'"]),
    ("inline $x^2$ and block $$\\frac{a}{b}$$", ["<msup><mi>x</mi><mn>2</mn></msup>", '<math display="block">']),
    ("\\(y<z\\) and \\[a\\]", ["<mo>&lt;</mo>", '<math display="block">']),
    ("it costs $5 and $10, and $x + y", ["costs $5 and $10, and $x + y"]),  # lone dollars: text, no warning
    ("\\$3", ["$3"]),
    ("[site](https://example.com)", ['<a href="https://example.com">site</a>']),
])
def test_to_html_keeps_markdown_code_and_latex(text, needles):
    from web_demo2 import to_html

    out = to_html(text)
    assert all(n in out for n in needles), out
    assert "formula incomplete" not in out and "convert-error" not in out


def test_logins_from_flags_a_file_or_the_environment(tmp_path, monkeypatch):
    from model.flags import logins

    monkeypatch.delenv("WEB_AUTH", raising=False)
    assert logins(None) == []
    assert logins(["ada:pa:ss", "bob:x"]) == [("ada", "pa:ss"), ("bob", "x")]  # the password may hold a colon
    path = tmp_path / "logins"
    path.write_text("# who may chat\nada:one\n\ncy:two\n", encoding="utf-8")
    assert logins([f"@{path}"]) == [("ada", "one"), ("cy", "two")]
    monkeypatch.setenv("WEB_AUTH", "env:user")
    assert logins(None) == [("env", "user")]
    for bad in ("nopassword", ":x", "ada:"):
        with pytest.raises(ValueError, match="USER:PASS"):
            logins([bad])
