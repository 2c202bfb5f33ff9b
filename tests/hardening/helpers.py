"""What every hardening test checks: exit 2, exactly one `sam2-layerwise CMD: error: --flag value: reason` line,
no traceback, nothing written; and real hostile files (image bombs, YAML bombs, pickles that run code)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from sam2_layerwise.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def cli(capsys, *argv) -> tuple[int, list[str]]:
    """Run the CLI in-process; (exit code, stderr lines)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]


def one_error(code: int, err: list[str], command: str, *needles: str) -> str:
    """Exit 2 and stderr is exactly one line, `sam2-layerwise COMMAND: error: ...`, holding every needle."""
    assert code == 2, (code, err)
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"sam2-layerwise {command}: error: "), line
    assert "internal error" not in line and "Traceback" not in line, line
    for needle in needles:
        assert str(needle) in line, (needle, line)
    return line


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too) -> a digest of what it is: bytes, link target or folder."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A real greyscale PNG whose IHDR says width x height and whose IDAT inflates to exactly that many
    zero pixels, built without ever holding them: after a full flush the deflate output of a chunk repeats, so
    the stream is one compressed chunk repeated (a 30000x30000 file is under 1 MB, decodes to 900 MB)."""
    total = (width + 1) * height  # one filter byte per row
    chunk = bytes(1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(total, len(chunk))
    body = first + again * (n - 1) + comp.compress(bytes(rest)) + comp.flush() if n else \
        comp.compress(bytes(rest)) + comp.flush()
    adler = ((total % 65521) << 16) | 1  # adler32 of `total` zero bytes: A stays 1, B adds 1 per byte
    data = b"\x78\xda" + body + struct.pack(">I", adler)

    def chunk_of(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk_of(b"IHDR", ihdr) + chunk_of(b"IDAT", data) + chunk_of(b"IEND", b""))
    return path


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """The classic: each level an anchored list of `width` aliases of the level before (width**levels nodes)."""
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


BOUNDED = r'''
import json, resource, sys, time
from sam2_layerwise.cli.main import main
# what the commands import on first use (the package's API is lazy): loaded before the bound, as a run's imports
import sam2.build_sam, sam2.sam2_image_predictor, sam2_layerwise.api, sam2_layerwise.quant, sam2_layerwise.store.image_run
status = open("/proc/self/status").read()
vm = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + ({extra_mb} << 20), resource.RLIM_INFINITY))
results = []
for argv in json.loads(sys.argv[1]):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    code = main(argv)
    results.append({{"code": code, "seconds": time.perf_counter() - t0,
                    "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0}})
sys.stderr.flush()
print(json.dumps(results))
'''


def run_bounded(cases: list[list[str]], extra_mb: int = 512) -> tuple[list[dict], list[str]]:
    """Run CLI invocations in a fresh process whose address space may grow only `extra_mb` beyond what the
    imports took (RLIMIT_AS), timing each and measuring how much its peak resident memory grew.
    Returns (per case {code, seconds, grew_kb}, stderr lines)."""
    proc = subprocess.run([sys.executable, "-c", BOUNDED.format(extra_mb=extra_mb), json.dumps(cases)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), [x for x in proc.stderr.splitlines() if x.strip()]
