"""Render the standard library's own documentation as the pages of a small documentation site.

This file uses the standard library alone: the sample-crawl stage runs it in a fresh
interpreter without site-packages (`python -S -s`, fixed hash seed), so the pages depend only
on the Python installation, not on what else is imported or installed. It prints one JSON
object per page.

The site has what real documentation sites have, boilerplate and near-duplicates included:
a header, sidebar and footer on every page; the same module published under the versioned
and the "latest" URL with a different header; modules that are aliases of each other
(`os.path` is `posixpath`); inherited docstrings repeated across classes.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import inspect
import io
import json
import pkgutil
import re
import sys
import warnings

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
HOST = "http://pydoc.local"

# Modules whose import has side effects (opens a browser, prints, needs a display) or that
# are not documentation (the test suite).
SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "pydoc_data", "xxsubtype", "xxlimited", "xxlimited_35",
}
MIRROR_EVERY = 7  # every 7th module page is also published under the "latest" URL

ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`]+)`")
ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # object reprs in signatures differ from run to run


def importable_modules() -> list[str]:
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP or name.startswith("_") or not _import(name):
            continue
        names.append(name)
        module = sys.modules[name]
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
            parts = info.name.split(".")[1:]
            if any(p.startswith("_") or p in ("test", "tests") for p in parts):
                continue
            if _import(info.name):
                names.append(info.name)
    # Modules published under a second name, as the real documentation does (os.path is
    # posixpath): natural near-duplicates that differ in their title and headers.
    aliases = [alias for alias, module in sys.modules.items()
               if module is not None and getattr(module, "__name__", alias) in names and alias != module.__name__
               and not alias.startswith("_") and alias not in names]
    return sorted(names + aliases)


def _import(name: str) -> bool:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module(name)
        return True
    except BaseException:  # noqa: BLE001 - platform modules raise anything from ImportError to SystemExit
        return False


COLUMNS = re.compile(r"\S {3,}\S")  # text laid out in columns: a table or a diagram, not prose


def docstring_html(doc: str | None) -> str:
    """Paragraphs of a docstring as HTML; doctests, indented blocks and blocks laid out in
    columns (ASCII tables and diagrams) as <pre>, as a documentation site shows them."""
    if not doc:
        return ""
    parts = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        if lines and (lines[0].lstrip().startswith((">>>", "|", "+")) or all(line.startswith("    ") for line in lines)
                      or any(COLUMNS.search(line) for line in lines)):  # examples, code, diagrams, aligned columns
            parts.append(f"<pre>{html.escape(block)}</pre>")
        else:
            text = ROLE.sub(r"\1", " ".join(line.strip() for line in lines))
            parts.append(f"<p>{html.escape(text)}</p>")
    return "\n".join(parts)


def _plain(text: str) -> str:
    return ROLE.sub(r"\1", text)


def grid_table_html(lines: list[str]) -> str:
    """An ASCII grid table (reST's, as Sphinx's text builder writes them) as an HTML table: the
    column edges are the `+` of its first border; a row's text lines are joined per cell; the
    row above a `+===+` border is the header."""
    border = lines[0].strip()
    indent = len(lines[0]) - len(lines[0].lstrip())
    edges = [i for i, c in enumerate(border) if c == "+"]
    rows: list[list[str]] = []
    current: list[str] | None = None
    header_rows = 0
    for line in lines[1:]:
        line = line[indent:]
        if line.startswith("+") or set(line.strip()) <= set("|+="):  # a border; `=` ends the header
            if current is not None:
                rows.append(current)
            current = None
            if "=" in line:
                header_rows = len(rows)
            continue
        cells = [line[a + 1:b].strip() for a, b in zip(edges, edges[1:])]
        current = cells if current is None else [f"{x} {y}".strip() for x, y in zip(current, cells)]
    if current is not None:
        rows.append(current)

    def row_html(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(_plain(c))}</{tag}>" for c in cells) + "</tr>"

    head = "".join(row_html(r, "th") for r in rows[:header_rows])
    body = "".join(row_html(r, "td") for r in rows[header_rows:])
    return f"<table>{'<thead>' + head + '</thead>' if head else ''}<tbody>{body}</tbody></table>"


def topic_html(text: str) -> str:
    """A reference-manual topic (Sphinx's text rendering) as HTML: grid tables as <table>,
    indented blocks (code, grammar, examples) as <pre>, the rest as paragraphs."""
    parts = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if lines[0].strip().startswith("+-") and lines[0].strip().endswith("+"):
            parts.append(grid_table_html(lines))
        elif all(line.startswith("   ") for line in lines) and not lines[0].lstrip().startswith(("* ", "- ")):
            parts.append(f"<pre>{html.escape(inspect.cleandoc(chr(10).join(lines)))}</pre>")
        else:
            parts.append(f"<p>{html.escape(_plain(' '.join(' '.join(lines).split())))}</p>")
    return "\n".join(parts)


def _signature(obj) -> str:
    try:
        return ADDRESS.sub("", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return "(...)"


def _public_members(module) -> list[tuple[str, object]]:
    members: list[tuple[str, object]] = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) == module.__name__:
            members.append((name, obj))
    return members


def module_body(name: str) -> str:
    module = sys.modules[name]
    # Members are listed under the module's own name, so an alias page repeats its original.
    doc = inspect.getdoc(module) or ""
    summary = doc.split("\n", 1)[0].rstrip(".") if doc else name
    sections = [f"<h1>{html.escape(name)} — {html.escape(summary)}</h1>", docstring_html(doc)]
    for member_name, obj in _public_members(module):
        kind = "class" if inspect.isclass(obj) else "function"
        sections.append(
            f'<section id="{member_name}"><h2>{kind} {html.escape(name)}.{member_name}'
            f"{html.escape(_signature(obj))}</h2>{docstring_html(inspect.getdoc(obj))}"
        )
        if inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                if method_name.startswith("_") or not inspect.isroutine(method):
                    continue
                sections.append(
                    f"<h3>{member_name}.{method_name}{html.escape(_signature(method))}</h3>"
                    f"{docstring_html(inspect.getdoc(method))}"
                )
        sections.append("</section>")
    return "\n".join(s for s in sections if s)


def page(title: str, body: str, version_label: str, neighbours: tuple[str, str]) -> str:
    previous, following = neighbours
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)} — Python {version_label} documentation</title></head>
<body>
<header><nav><a href="/">Python {version_label} documentation</a> »
<a href="/{version_label}/library/index.html">The Python Standard Library</a> » {html.escape(title)}</nav>
<form role="search" action="/search.html"><input type="text" name="q"><input type="submit" value="Go"></form></header>
<div class="sidebar"><h3>Navigation</h3><ul>
<li><a href="/{version_label}/py-modindex.html">modules</a></li>
<li>previous: <a href="{previous}.html">{html.escape(previous)}</a></li>
<li>next: <a href="{following}.html">{html.escape(following)}</a></li></ul>
<h3>This page</h3><ul><li><a href="#">Report a bug</a></li><li><a href="#">Show source</a></li></ul></div>
<main><article>
{body}
</article></main>
<footer>© Copyright 2001 Python Software Foundation. This page is licensed under the Python Software
Foundation License Version 2. Python {version_label} documentation, generated by pydoc from the
docstrings of the standard library. <a href="/{version_label}/bugs.html">Found a bug</a>?</footer>
</body></html>
"""


def pages() -> list[dict]:
    warnings.simplefilter("ignore")
    names = importable_modules()
    out = []
    for i, name in enumerate(names):
        neighbours = (names[i - 1], names[(i + 1) % len(names)])
        body = module_body(name)
        out.append({"url": f"{HOST}/{VERSION}/library/{name}.html", "html": page(name, body, VERSION, neighbours)})
        if i % MIRROR_EVERY == 0:  # the same page under the "latest" URL, other header and footer
            out.append({"url": f"{HOST}/3/library/{name}.html", "html": page(name, body, "3", neighbours)})
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        body = f"<h1>{html.escape(topic)}</h1>\n{topic_html(topics[topic])}"
        out.append({"url": f"{HOST}/{VERSION}/reference/topics/{topic}.html",
                    "html": page(topic, body, VERSION, (topic, topic))})
    return out


if __name__ == "__main__":
    for item in pages():
        sys.stdout.write(json.dumps(item) + "\n")
