"""Instruction and preference data from the standard library's own documentation.

The offline default of the SFT and DPO stages: every Python installation carries these
docstrings, so no download is needed. This file uses the standard library alone; the stages
run it in a fresh interpreter without site-packages (`python -S -s`, fixed hash seed), as the
sample crawl runs sample_pages.py, so the data depends only on the Python installation.

    python -S -s model/stdlib_qa.py sft   one {"instruction", "output"} object per line
    python -S -s model/stdlib_qa.py dpo   one {"prompt", "chosen", "rejected"} object per line

Questions (the wording varies by a stable hash of the name):
  "What does `json.dumps` do?"          -> the first paragraph of its docstring
  "What is the `json` module for?"      -> the first paragraph of the module's docstring
  "Which module provides `dumps`?"      -> "`dumps` is in the `json` module." (unique names only)
  "What is the signature of `json.dumps`?" -> "`json.dumps(obj, *, skipkeys=False, ...)`"
Preferences: for "what does X do" questions, chosen = X's own summary; rejected = another
object's summary, the summary cut off mid-sentence, or its words shuffled (by turns).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import random
import re
import sys
import warnings
import zlib

MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "builtins", "bz2", "calendar", "cmath",
    "codecs", "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.utils", "enum", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "locale", "logging", "lzma", "math", "mimetypes", "operator", "os",
    "os.path", "pathlib", "pickle", "pkgutil", "platform", "poplib", "pprint", "queue", "quopri", "random", "re",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "sys", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "urllib.request",
    "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
]
BUILTIN_TYPES = ["str", "bytes", "list", "dict", "set", "frozenset", "tuple", "int", "float", "bytearray"]
MAX_ANSWER = 400

ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`]+)`")            # :func:`x` -> `x`
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")          # "dumps(obj, ...)" in C docstrings
ADDRESS = re.compile(r" at 0x[0-9a-f]+")

WHAT_DOES = ["What does `{}` do?", "Explain `{}` briefly.", "What is `{}` for?", "Describe `{}`."]
WHAT_IS_CLASS = ["What is `{}`?", "Explain the class `{}`.", "What is `{}` used for?"]
MODULE_FOR = ["What is the `{}` module for?", "What does the `{}` module provide?"]
WHICH_MODULE = ["Which module provides `{}`?", "Where do I find `{}` in the standard library?"]
SIGNATURE = ["What is the signature of `{}`?", "How do I call `{}`?"]


def pick(options: list[str], name: str) -> str:
    return options[zlib.crc32(name.encode()) % len(options)]


def summary(doc: str | None) -> str | None:
    """The first prose paragraph of a docstring, on one line; None when there is none."""
    if not doc:
        return None
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.strip().splitlines()
        if not lines or SIGNATURE_LINE.match(lines[0].strip()) or lines[0].lstrip().startswith(">>>"):
            continue
        text = ROLE.sub(r"`\1`", " ".join(line.strip() for line in lines)).replace("``", "`")
        if len(text) < 20:
            return None
        if len(text) > MAX_ANSWER:
            cut = text.rfind(". ", 0, MAX_ANSWER)
            if cut < 40:
                return None
            text = text[:cut + 1]
        return text
    return None


def public_objects(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    found: list[tuple[str, object]] = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if obj is None or name.startswith("_") or inspect.ismodule(obj):
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            found.append((name, obj))
    return found


def own_doc(obj) -> str | None:
    """A class's own docstring (inspect.getdoc would borrow its base class's)."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else inspect.getdoc(obj)
    return doc if isinstance(doc, str) else None


def signature(qualified: str, obj) -> str | None:
    if inspect.isclass(obj):
        return None
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    text = ADDRESS.sub("", text)
    return f"`{qualified}{text}`" if len(text) <= 160 else None


def collect() -> tuple[list[dict], list[dict]]:
    """(instruction entries, "what does X do" entries with the object's name) in a fixed order."""
    entries: list[dict] = []
    described: list[dict] = []
    seen: set[int] = set()
    homes: dict[str, list[str]] = {}
    for module_name in MODULES:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except BaseException:  # noqa: BLE001 - a module this platform lacks
            continue
        about = summary(module.__doc__)
        if about and module_name != "builtins":
            entries.append({"instruction": pick(MODULE_FOR, module_name).format(module_name), "output": about})
        objects = public_objects(module)
        if module_name == "builtins":
            objects += [(f"{t}.{m}", getattr(getattr(module, t), m)) for t in BUILTIN_TYPES
                        for m in sorted(vars(getattr(module, t))) if not m.startswith("_")]
        for name, obj in objects:
            if id(obj) in seen:
                continue  # an alias (os.path is posixpath): asked once, under its first name
            seen.add(id(obj))
            qualified = name if module_name == "builtins" else f"{module_name}.{name}"
            homes.setdefault(name, []).append(module_name)
            answer = summary(own_doc(obj))
            if answer:
                templates = WHAT_IS_CLASS if inspect.isclass(obj) else WHAT_DOES
                question = pick(templates, qualified).format(qualified)
                entries.append({"instruction": question, "output": answer})
                described.append({"prompt": question, "answer": answer, "name": qualified})
            call = signature(qualified, obj)
            if call:
                entries.append({"instruction": pick(SIGNATURE, qualified).format(qualified), "output": call})
    for name, modules in sorted(homes.items()):
        if len(modules) == 1 and modules[0] != "builtins" and len(name) > 3 and "." not in name:
            entries.append({"instruction": pick(WHICH_MODULE, name).format(name),
                            "output": f"`{name}` is in the `{modules[0]}` module: `{modules[0]}.{name}`."})
    return entries, described


def preferences(described: list[dict]) -> list[dict]:
    pairs = []
    n = len(described)
    for i, item in enumerate(described):
        rng = random.Random(zlib.crc32(item["name"].encode()))
        words = item["answer"].split()
        kind = i % 3
        if kind == 0 or len(words) < 6:
            other = described[(i + 1 + rng.randrange(n - 1)) % n]["answer"] if n > 1 else ""
            rejected = other if other != item["answer"] else " ".join(reversed(words))
        elif kind == 1:
            rejected = " ".join(words[: max(2, len(words) // 3)])
        else:
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            rejected = " ".join(shuffled)
        if rejected and rejected != item["answer"]:
            pairs.append({"prompt": item["prompt"], "chosen": item["answer"], "rejected": rejected})
    return pairs


def main(argv: list[str]) -> None:
    kind = argv[0] if argv else "sft"
    if kind not in ("sft", "dpo"):
        raise SystemExit(f"usage: python -S -s stdlib_qa.py sft|dpo (got {kind!r})")
    entries, described = collect()
    rows = entries if kind == "sft" else preferences(described)
    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n")
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
