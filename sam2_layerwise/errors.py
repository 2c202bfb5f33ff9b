"""One exception root. The CLI turns every `LayerwiseError` into `sam2-layerwise: error: ...` and exit 2."""

from __future__ import annotations


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
        if self.flag is None:
            return self.detail
        if self.value is None:
            return f"{self.flag}: {self.detail}"
        shown = " ".join(map(str, self.value)) if isinstance(self.value, (list, tuple)) else str(self.value)
        return f"{self.flag} {shown}: {self.detail}"


class InputError(LayerwiseError):
    """An input file or value is missing, unreadable or out of range."""


class ModelError(LayerwiseError):
    """A config or checkpoint cannot be turned into a SAM 2 model."""


class CaptureError(LayerwiseError):
    """Capture could not run as asked (e.g. a compiled model whose hooks do not fire)."""


def few(items: list[str], n: int = 3) -> str:
    """The first `n` items of a list for a one-line message, and how many more there are."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
