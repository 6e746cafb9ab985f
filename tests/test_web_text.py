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


@pytest.mark.parametrize("text, shown", [
    ("![cat](https://example.com/cat.png)", "\\![cat](https://example.com/cat.png)"),
    ("a ![r][ref] b\n\n[ref]: https://example.com/r.png", "a \\![r][ref] b\n\n[ref]: https://example.com/r.png"),
    ("`![code](x)` and ![y](http://example.com/y)", "`![code](x)` and \\![y](http://example.com/y)"),
    ("```\n![fenced](x)\n```\n![z](//example.com/z)", "```\n![fenced](x)\n```\n\\![z](//example.com/z)"),
    ("~~~md\n![unclosed fence](x)", "~~~md\n![unclosed fence](x)"),
    ("\\![escaped](x)", "\\![escaped](x)"),  # already text
    ("\\\\![after a backslash](x)", "\\\\\\![after a backslash](x)"),  # "\\" is a backslash: the image was real
    ("no images [a link](https://example.com)!", "no images [a link](https://example.com)!"),
])
def test_images_as_links_leaves_no_image_to_load(text, shown):
    """The Streamlit pages render markdown; an image in it is loaded from wherever it points, so a reply could
    send the browser to any server. images_as_links escapes each image's "!" outside code: what is left is a
    link to the address (checked with Python-Markdown, a CommonMark-like renderer)."""
    import markdown

    from server.webchat import images_as_links

    assert images_as_links(text) == shown
    if "~~~" in text:  # CommonMark (Streamlit) reads an unclosed fence as code to the end; Python-Markdown does not
        return
    html = markdown.markdown(images_as_links(text), extensions=["fenced_code"])
    assert "<img" not in html, html
    if "](http" in text.split("`")[-1] or "[ref]:" in text:
        assert "<a href=" in html, html


@pytest.mark.parametrize("text, link", [
    ("![cat](https://example.com/cat.png)", '<a href="https://example.com/cat.png">cat</a>'),
    ("![](http://example.com/x.png)", '<a href="http://example.com/x.png">http://example.com/x.png</a>'),
    ("![r][ref]\n\n[ref]: https://example.com/r.png", '<a href="https://example.com/r.png">r</a>'),
    ("![bad](javascript:alert(1))", "<a>bad</a>"),
])
def test_to_html_shows_images_as_links(text, link):
    from web_demo2 import to_html

    out = to_html(text)
    assert "<img" not in out and link in out, out
