"""The demo checkpoint's text (fastlm/demo/README.md): the Python documentation shipped with CPython
(``pydoc_data.topics``) plus the stdlib's docstrings, lightly cleaned, and its train / validation split.

scripts/train_demo.py trains on :func:`split_documents`' first half; fastlm.bench.quality scores the second
(held out: never trained on). The stdlib's text differs a little between CPython versions: the checkpoint was
made with CPython 3.11.7 (its README gives the document and token counts to check against).
"""
from __future__ import annotations

import ast
import os
import re
import sysconfig

HOLDOUT_EVERY, HOLDOUT_INDEX = 25, 7  # document i is held out when i % 25 == 7

# Stdlib folders whose docstrings are tests, GUI code or vendored tools rather than prose.
SKIP_DIRS = {
    "test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3",
    "turtledemo", "tkinter", "ensurepip", "venv", "config-3", "pydoc_data",
}


_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")
_WS = re.compile(r"[ \t]+")


def clean(text: str) -> str:
    """Light cleaning: drop heading underlines and doctest lines, re-flow each paragraph onto one
    line, keep blank lines as paragraph breaks. Indented code blocks are kept (re-flowed)."""
    paragraphs, cur = [], []
    for line in text.replace("\r", "").split("\n"):
        if _UNDERLINE.match(line) or _DOCTEST.match(line):
            continue
        line = _WS.sub(" ", line.strip())
        if not line:
            if cur:
                paragraphs.append(" ".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        paragraphs.append(" ".join(cur))
    # Drop tiny fragments (lone headings, "Parameters", ...) that carry no sentence.
    paragraphs = [p for p in paragraphs if len(p) >= 3]
    return "\n".join(paragraphs).strip()


def pydoc_documents() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [clean(topics[k]) for k in sorted(topics)]


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        doc = clean(doc)
                        if len(doc) >= min_chars:
                            docs.append(doc)
    return docs


def gather_documents(use_stdlib: bool) -> list[str]:
    docs = [d for d in pydoc_documents() if d]
    if use_stdlib:
        docs += stdlib_docstrings()
    # Deduplicate (many docstrings are repeated across modules), keep first-seen order.
    seen, out = set(), []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """-> (training documents, held-out validation documents): every 25th document is held out."""
    train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_INDEX]
    held_out = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_INDEX]
    return train, held_out
