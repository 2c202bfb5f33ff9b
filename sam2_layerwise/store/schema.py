"""The schema version every file this tool reads back carries: a reader refuses a missing or malformed one, and a
newer one than it knows (fields it would misread)."""

from __future__ import annotations


def version_problem(data: dict, what: str, newest: int) -> str | None:
    """Why `data["schema_version"]` cannot be read by this tool, or None when it can (1..newest)."""
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"{what} has no valid schema_version"
    if version > newest:
        return f"{what} is schema version {version}, newer than this tool reads ({newest}); upgrade sam2-layerwise"
    return None
