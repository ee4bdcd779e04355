"""The English prose the vqkv tools run the model over.

The default text is "The Adventures of Sherlock Holmes" by Arthur Conan Doyle,
Project Gutenberg eBook #1661 (public domain), as shipped in the test data of
the Debian 12 package ``golang-github-pierrec-lz4-dev`` (no dependencies,
about 5 MB): ``apt-get install golang-github-pierrec-lz4-dev``.

The Project Gutenberg header and license are cut off, line endings normalised
and hard-wrapped lines joined, so that every paragraph is one line and
paragraphs are separated by a blank line, as prose usually reaches a model.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_TEXT = Path("/usr/share/gocode/src/github.com/pierrec/lz4/testdata/pg1661.txt")
DEFAULT_SOURCE = (
    "The Adventures of Sherlock Holmes (Arthur Conan Doyle, Project Gutenberg #1661), "
    "from Debian package golang-github-pierrec-lz4-dev"
)

_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_END = re.compile(
    r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.MULTILINE | re.IGNORECASE,
)


def clean_text(raw: str) -> str:
    """Strips a Project Gutenberg frame, if any, and unwraps paragraphs."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n")
    if start := _START.search(text):
        text = text[start.end() :]
    if end := _END.search(text):
        text = text[: end.start()]
    paragraphs = (" ".join(line.strip() for line in p.splitlines()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def load_text(path: str | Path | None = None) -> tuple[str, str]:
    """Returns (cleaned text, description of its source)."""
    path = Path(path) if path else DEFAULT_TEXT
    if not path.exists():
        hint = " (apt-get install golang-github-pierrec-lz4-dev)" if path == DEFAULT_TEXT else ""
        raise FileNotFoundError(f"text not found: {path}{hint}")
    source = DEFAULT_SOURCE if path == DEFAULT_TEXT else str(path)
    return clean_text(path.read_text(encoding="utf-8")), source
