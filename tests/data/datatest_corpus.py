"""Corpus helpers for the data tests (a uniquely named module: tests/ folders are not packages)."""
import json
import os
import sysconfig

EXTRA_DOCS = [
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🚀 and a literal <eod> inside text",
    "short",
    "tabs\tand\n\n  blank lines\n\nkept as they are\n",
]


def stdlib_docs(count: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    docs = []
    for name in names:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text = f.read()
        if text.strip() and len(text) < 60_000:
            docs.append(text)
        if len(docs) == count:
            break
    return docs


def write_jsonl(path, docs, key="text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc, "meta": 1}) + "\n")
    return str(path)
