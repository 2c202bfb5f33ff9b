"""YAML from users, read with limits: file size, nesting, nodes after alias expansion, duplicate keys, and (for
OmegaConf files) how far `${...}` interpolations expand.

PyYAML shares an anchored node between its aliases, so a "billion laughs" file loads in microseconds but
explodes in whatever walks the result (a copy, OmegaConf, a checkpoint). The node count is therefore taken
over the alias-expanded tree, with each distinct node counted once per use and memoised, so the check itself
is bounded by the file's size.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from sam2_layerwise.errors import LayerwiseError, condense

MAX_DEPTH = 64
MAX_NODES = 100_000
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.YAMLError):
    """A limit this module enforces; `mark` says where, when known."""

    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.message = message
        self.mark = mark


class LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses deep nesting, alias bombs, self-referencing aliases and duplicate keys."""

    max_depth = MAX_DEPTH
    max_nodes = MAX_NODES

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise _Refused(f"nests deeper than {self.max_depth} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, self.max_nodes)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
                    continue  # merged keys may be overridden; complex keys are not ours to judge
                key = self.construct_object(key_node)
                if key in seen:
                    raise _Refused(f"duplicate key '{key}': the mapping gives it twice; keep one", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(root, limit: int) -> int:
    """Nodes of the tree with every alias expanded, memoised per node; refuses cycles and more than `limit`."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise _Refused("an alias refers to a node that contains it (a recursive structure)", node.start_mark)
        open_.add(key)
        children = []
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise _Refused(f"has more than {limit} YAML nodes once its aliases are expanded", node.start_mark)
        open_.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _where(exc) -> str:
    mark = getattr(exc, "mark", None) or getattr(exc, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def read_yaml(path: str | Path, *, flag: str, value: str, error: type[LayerwiseError], max_bytes: int,
              loader: type[LimitedLoader] = LimitedLoader) -> tuple[str, object]:
    """(text, parsed data) of a YAML file a user named with `flag`; every problem is one `error` line."""
    p = Path(path).expanduser()
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise error(f"is {size} bytes; a config this tool reads is at most {max_bytes} bytes", flag=flag,
                        value=value)
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read: {condense(exc.strerror or exc)}", flag=flag, value=value) from None
    if len(raw) > max_bytes:
        raise error(f"is more than {max_bytes} bytes; a config this tool reads is at most that", flag=flag, value=value)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"is not UTF-8 text (byte {exc.start})", flag=flag, value=value) from None
    try:
        data = yaml.load(text, Loader=loader)  # noqa: S506 - LimitedLoader is a SafeLoader
    except _Refused as exc:
        raise error(f"{exc.message}{_where(exc)}", flag=flag, value=value) from None
    except yaml.MarkedYAMLError as exc:
        what = " ".join(s for s in (exc.context, exc.problem) if s) or "syntax error"
        raise error(f"not valid YAML: {condense(what)}{_where(exc)}", flag=flag, value=value) from None
    except ValueError as exc:  # Python refuses to convert integers of more than 4300 digits
        raise error(f"not valid YAML: a number is too long ({condense(exc).split(';')[0]})", flag=flag,
                    value=value) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise error(f"not valid YAML: {condense(exc)}", flag=flag, value=value) from None
    return text, data


_INTERP = re.compile(r"\$\{([^${}]*)\}")


def check_interpolations(data, *, limit: int, flag: str, value: str, error: type[LayerwiseError]) -> None:
    """Refuse OmegaConf `${...}` interpolations that would expand to more than `limit` characters (strings that
    each repeat another interpolated string: a billion laughs OmegaConf builds at resolve time) or refer to
    themselves. Plain `${a.b}`, `${.x}` and `${..x}` references are followed; resolvers count as their text."""
    memo: dict[tuple, int] = {}
    open_: set[tuple] = set()

    def lookup(path: tuple):
        node = data
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdecimal() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def target(ref: str, at: tuple) -> tuple | None:
        if ":" in ref or not ref:  # a resolver (oc.env:HOME, ...): its text only
            return None
        if ref.startswith("."):
            dots = len(ref) - len(ref.lstrip("."))
            base = at[:len(at) - dots] if dots <= len(at) else ()
            return (*base, *ref[dots:].split(".")) if ref[dots:] else None
        return tuple(ref.split("."))

    def size(node, at: tuple) -> int:
        if at in memo:
            return memo[at]
        if at in open_:
            raise error(f"{'.'.join(at)}: an interpolation refers to itself", flag=flag, value=value)
        open_.add(at)
        if isinstance(node, dict):
            total = sum(size(v, (*at, str(k))) for k, v in node.items()) + 2
        elif isinstance(node, list):
            total = sum(size(v, (*at, str(i))) for i, v in enumerate(node)) + 2
        elif not isinstance(node, str) or "${" not in node:
            total = len(str(node))
        else:
            total = len(_INTERP.sub("", node))
            for ref in _INTERP.findall(node):
                path = target(ref.strip(), at)
                found = lookup(path) if path is not None else None
                total += size(found, path) if found is not None else len(ref) + 3
                if total > limit:
                    raise error(f"{'.'.join(at)}: its ${{...}} interpolations expand to more than {limit} "
                                "characters", flag=flag, value=value)
        open_.discard(at)
        memo[at] = total
        return total

    try:
        size(data, ())
    except RecursionError:
        raise error("its ${...} interpolations refer to each other too deeply", flag=flag, value=value) from None
