"""`sam2-layerwise`: one console script, one subcommand per pipeline stage, one error -> exit mapping."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import warnings

from sam2_layerwise.cli.common import Parser
from sam2_layerwise.errors import LayerwiseError, one_line

EXIT_USAGE = 2
EXIT_INTERNAL = 1
# the machine, not the tool: a full disk or quota, a read-only file system, a file too large, an I/O error
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, schedulers, containers) unwinds a run exactly like Ctrl-C: staging is removed and the
    previous run directory stays as it was."""

    signum = signal.SIGTERM


_SIGNALLED: list[int] = []  # signals received during this command (a library may re-wrap the exception they raise)


def _raise_terminated(signum, frame):
    _SIGNALLED.append(signum)
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

EPILOG = """examples:
  sam2-layerwise visualize --config configs/sam2.1/sam2.1_hiera_t.yaml --checkpoint sam2.1_hiera_tiny \\
      --image examples/images/chelsea.png --points 220 150 1 --save-attn --render-attn-overlay
  sam2-layerwise init-checkpoint --config configs/sam2.1/sam2.1_hiera_b+.yaml --output random_b+.pt
run 'sam2-layerwise COMMAND --help' for a command's flags."""


def _commands():
    """name -> (module with add_arguments/run, help). A registry: adding a command is adding an entry."""
    from sam2_layerwise.cli import compare, generate, init_checkpoint, quantize, render, sweep, view, visualize, visualize_quantized

    return {
        "visualize": (visualize, "capture every attention module for one image and a click; write the run directory"),
        "render": (render, "draw a saved run again without the model: colormap, overlays, more queries, top-k"),
        "visualize-quantized": (visualize_quantized, "visualize with a required --adaptive-qat-config (the seed's "
                                                     "visualize_layerwise_quantized.py)"),
        "compare": (compare, "capture a float SAM 2 and its quantized twin on one image: one run directory "
                             "with both (the seed's compare_quantization.py)"),
        "generate": (generate, "per layer and head metrics of a compare run (JS, entropy, top-k, q/k/v error), "
                               "output impact, tables and plots"),
        "sweep": (sweep, "compare the float and quantized models over many images (a folder or a manifest): Parquet "
                         "tables, per layer x head ranking over items, causal per-layer attribution; resumable; "
                         "local or on Ray"),
        "view": (view, "serve a run's viewer page locally: browse layers and heads, click any point of the photograph "
                       "to see both models' attention there (recomputed from saved q/k, no model)"),
        "quantize": (quantize, "calibrate a quantized checkpoint from a float one on a few images (post-training)"),
        "init-checkpoint": (init_checkpoint, "write a randomly initialised checkpoint in SAM 2's format (tests, benchmarks)"),
    }


def build_parser() -> Parser:
    parser = Parser(prog="sam2-layerwise", description="Open SAM 2 up layer by layer.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help_text) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=getattr(module, "EXAMPLES", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--traceback", action="store_true", help="show Python tracebacks (for developers)")
        p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
        p.set_defaults(_run=module.run, _runs_models=getattr(module, "RUNS_MODELS", False))
    return parser


def _too_long(parser, args, exc: OSError) -> str | None:
    """ENAMETOOLONG from a path the user gave (or one derived from it, such as an output folder's staging name):
    the usage error naming that flag and value, or None when no given path explains it."""
    if exc.errno != errno.ENAMETOOLONG:
        return None
    long_names = [c for c in os.fsdecode(exc.filename or "").split(os.sep) if len(os.fsencode(c)) > 255]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    for action in sub._actions:
        given = getattr(args, action.dest, None)
        for value in given if isinstance(given, list) else [given]:
            if not isinstance(value, str):
                continue
            names = [c for c in value.split(os.sep) if c]
            if any(len(os.fsencode(c)) > 255 for c in names) or any(c in n for c in names for n in long_names):
                flag = action.option_strings[0] if action.option_strings else action.metavar or action.dest
                return (f"{flag} {one_line(value, 120)}: a name in this path is longer than the file system allows "
                        f"(255 bytes)")
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, see Parser.error) and --help
        return int(exc.code or 0)
    except KeyboardInterrupt:  # Ctrl-C while starting: nothing was begun
        sys.stderr.write("sam2-layerwise: interrupted; nothing was changed\n")
        return 130
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the summary
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from sam2_layerwise.store.layout import COMMITTED

    COMMITTED.clear()
    _SIGNALLED.clear()
    if args._runs_models:  # a process of our own that runs SAM 2 (sam2_layerwise/allocator.py)
        from sam2_layerwise.allocator import tune_for_tensors

        tune_for_tensors()
    try:
        with _sigterm_as_interrupt():
            return int(args._run(args) or 0)
    except LayerwiseError as exc:
        if args.traceback:
            raise
        sys.stderr.write(f"sam2-layerwise {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except BaseException as exc:
        # a signal raised inside a library call may come back as the library's own error (torch.save: RuntimeError)
        interrupted = isinstance(exc, KeyboardInterrupt) or (bool(_SIGNALLED) and isinstance(exc, Exception))
        done = f"; {', '.join(map(str, COMMITTED))} had already been written" if COMMITTED else \
            "; nothing was changed"
        too_long = None if interrupted or not isinstance(exc, OSError) else _too_long(parser, args, exc)
        if too_long and not args.traceback:
            sys.stderr.write(f"sam2-layerwise {args.command}: error: {too_long}{done}\n")
            return EXIT_USAGE
        if not interrupted and isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE and not args.traceback:
            where = f" {exc.filename}" if exc.filename else ""
            sys.stderr.write(f"sam2-layerwise {args.command}: error: cannot write{where}: {exc.strerror}{done}\n")
            return EXIT_INTERNAL
        if not interrupted:
            if not isinstance(exc, Exception) or args.traceback:
                raise
            sys.stderr.write(f"sam2-layerwise {args.command}: internal error: {type(exc).__name__}: {exc} "
                             "(rerun with --traceback and report it)\n")  # a bug, not a user mistake
            return EXIT_INTERNAL
        terminated = bool(_SIGNALLED) or isinstance(exc, Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        sys.stderr.write(f"sam2-layerwise {args.command}: {what}{done}\n")
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
