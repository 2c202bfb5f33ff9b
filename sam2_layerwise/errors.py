"""One exception root. The CLI turns every `LayerwiseError` into `sam2-layerwise: error: ...` and exit 2."""

from __future__ import annotations

import re


class LayerwiseError(Exception):
    """A problem the user can fix: bad flag value, unreadable file, checkpoint that does not fit.

    `flag` names the command-line flag (or API argument) the value came from, so the one-line message
    can say `--points 1 2: ...`.
    """

    def __init__(self, message: str, *, flag: str | None = None, value: object = None):
        self.flag = flag
        self.value = value
        self.detail = message
        super().__init__(self._format())

    def _format(self) -> str:
        detail = one_line(" ".join(self.detail.split("\n")))
        if self.flag is None:
            return detail
        if self.value is None:
            return f"{self.flag}: {detail}"
        shown = " ".join(map(str, self.value)) if isinstance(self.value, (list, tuple)) else str(self.value)
        return f"{self.flag} {one_line(shown, 200)}: {detail}"


class InputError(LayerwiseError):
    """An input file or value is missing, unreadable or out of range."""


class ModelError(LayerwiseError):
    """A config or checkpoint cannot be turned into a SAM 2 model."""


class CaptureError(LayerwiseError):
    """Capture could not run as asked (e.g. a compiled model whose hooks do not fire)."""


def one_line(text: str, limit: int | None = None) -> str:
    """`text` on one line: control characters (a newline in a file name) escaped; at most `limit` characters."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def utf8_text(text: str) -> str:
    """`text` as valid Unicode: a file name that is not UTF-8 (Python gives its odd bytes as lone surrogates,
    `caf\\udce9.png`) keeps its readable part and shows those bytes as `\\xe9`, so tables and pages can hold it."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def few(items: list[str], n: int = 3) -> str:
    """The first `n` items of a list for a one-line message, and how many more there are."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(\[])")


def condense(exc: BaseException | str, limit: int = 240) -> str:
    """A library's message as one readable line: whitespace runs (newlines, tabs) become one space, and a
    message longer than `limit` keeps its first whole sentences; a single sentence longer than that is cut at
    a word and marked with '...'. Empty messages give the exception's type name."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    text = " ".join(_ANSI.sub("", text).split()) or (type(exc).__name__ if not isinstance(exc, str) else "")
    if len(text) <= limit:
        return text
    out = ""
    for sentence in _SENTENCE_END.split(text):
        if out and len(out) + 1 + len(sentence) > limit:
            break
        out = f"{out} {sentence}" if out else sentence
    if len(out) > limit:
        out = out[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return out
