"""Coverage-guided fuzzing of EdgeGuard's untrusted parsers (atheris / libFuzzer), one target at a time.

    python tools/fuzz.py --minutes 10 [--target NAME ...] [--out DIR] [--json]
    python tools/fuzz.py --seconds 20 --target body          # what the test suite's short run does
    python tools/fuzz.py --target body --reproduce FILE      # run one saved input, show the traceback
    python tools/fuzz.py --list

Targets and what each asserts are in ``tools/fuzzing/harnesses.py``. Each target runs in a child process of
its own, so that one crash, hang or runaway allocation ends that target only, and so that the child can bound
itself:

- crash: any exception other than the parser's documented refusal escapes the harness;
- hang: one input runs longer than ``--timeout`` seconds (libFuzzer's per-input alarm);
- over-limit allocation: the child sets ``RLIMIT_AS`` to what it has mapped after set-up plus the target's
  headroom, so one allocation past the bound fails at once with ``MemoryError`` (a crash with its own name).
  An address-space limit costs nothing per execution, where ``tracemalloc`` would slow every Python
  allocation several times over and a sampled RSS limit would miss a short spike.

Each target's corpus grows under ``OUT/corpus/<target>`` (seeded with real inputs: bundles built by the pack
code, bodies, frames, token files); inputs that fail are saved under ``OUT/crashes/<target>/``. Exit status:
0 when every target ran without a finding, 1 when any target found one, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
# The tree this tool is in, not whatever edgeguard is installed: a fuzz run tests the code beside it.
sys.path[:0] = [str(TOOLS), str(ROOT)]
# Coverage of these guides the fuzzer: our parsers, and numpy's .npy header reader (its functions only).
INSTRUMENT = ["edgeguard"]
NUMPY_FORMAT = ("numpy.lib._format_impl", "numpy.lib.format")  # numpy 2 / numpy 1
# Imported before instrumentation starts: the import hook makes every import in its block several times
# slower (numpy alone took 10 s), and their coverage would only dilute ours.
THIRD_PARTY = (
    "numpy",
    "cryptography.hazmat.primitives.hpke",
    "paho.mqtt.client",
    "aiohttp",
    "PIL.Image",
    "onnx",
)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
_PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+).*?exec/s: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    executions: int = 0
    execs_per_s: int = 0
    coverage: int = 0  # libFuzzer "cov": edges (here: Python branches) reached
    features: int = 0  # libFuzzer "ft": coverage features (edges x hit-count buckets, comparisons)
    corpus: int = 0
    finding: str | None = None  # None, or crash / hang / over-limit allocation
    detail: str = ""  # last line of the traceback or libFuzzer's reason
    input: str | None = None  # the saved input that caused the finding
    seconds: float = 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, help="time per target")
    ap.add_argument("--seconds", type=float, help="time per target (instead of --minutes)")
    ap.add_argument("--runs", type=int, default=0, help="stop a target after this many executions")
    ap.add_argument("--target", action="append", help="a target name (repeatable); default all")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "fuzz", help="corpus and crash directory")
    ap.add_argument("--timeout", type=int, default=5, help="seconds one input may run (a hang beyond)")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    ap.add_argument("--list", action="store_true", help="list the targets")
    ap.add_argument("--reproduce", type=Path, help="run one saved input against the (single) target")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    from fuzzing.harnesses import TARGETS
    from fuzzing.selftest import SELFTESTS

    known = [t.name for t in TARGETS]
    if args.list:
        for t in TARGETS:
            print(f"{t.name:16} {t.refusal:20} {t.parser}")
        return 0
    chosen = args.target or known
    unknown = sorted(set(chosen) - set(known) - {t.name for t in SELFTESTS})
    if unknown:
        print(f"fuzz: unknown target {unknown[0]!r} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    if args.reproduce:
        if len(chosen) != 1:
            print("fuzz: --reproduce needs exactly one --target", file=sys.stderr)
            return 2
        return _reproduce(chosen[0], args.reproduce)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 0) * 60
    if seconds <= 0 and args.runs <= 0:
        print("fuzz: give --minutes, --seconds or --runs", file=sys.stderr)
        return 2
    results = [_run_target(name, seconds, args) for name in chosen]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        _table(results, args.out)
    return 1 if any(r.finding for r in results) else 0


def _run_target(name: str, seconds: float, args: argparse.Namespace) -> Result:
    out: Path = args.out
    for sub in ("corpus", "seeds", "crashes"):
        (out / sub / name).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out)]
    cmd += ["--timeout", str(args.timeout), "--runs", str(args.runs)]
    cmd += ["--seconds", str(max(1, round(seconds)) if seconds > 0 else 0)]
    # One malloc arena (no 64 MiB reservation per thread inside the address-space bound) and one BLAS thread
    # (the fuzzer is single-threaded; idle BLAS workers only take CPU from others).
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    result = Result(name)
    started = time.monotonic()
    tty = sys.stderr.isatty() and not args.json
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as child:
        assert child.stdout is not None  # atheris prints the traceback on stdout, libFuzzer on stderr
        for line in child.stdout:
            lines.append(line.rstrip("\n"))
            del lines[:-400]  # the tail holds the verdict and a traceback; progress lines are many
            m = _PROGRESS.match(line)
            if m:
                result.executions, result.coverage, result.features, result.execs_per_s = map(int, m.groups())
                if tty:
                    print(
                        f"\r{name:16} {result.executions:>10} execs {result.execs_per_s:>6}/s "
                        f"cov {result.coverage} ft {result.features}   ",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
        rc = child.wait()
    if tty:
        print(file=sys.stderr)
    result.seconds = round(time.monotonic() - started, 1)
    _parse_verdict(result, lines, rc)
    result.corpus = sum(1 for _ in (out / "corpus" / name).iterdir())
    return result


def _parse_verdict(result: Result, lines: list[str], rc: int) -> None:
    stats = {m.group(1): int(m.group(2)) for m in map(_STAT.match, lines) if m}
    result.executions = stats.get("number_of_executed_units", result.executions)
    result.execs_per_s = stats.get("average_exec_per_sec", result.execs_per_s)
    for line in lines:
        m = _ARTIFACT.search(line)
        if m:
            result.input = m.group(1)
    text = "\n".join(lines)
    if rc == 0 and "Done " in text:
        return
    if "libFuzzer: timeout" in text:
        result.finding, result.detail = "hang", next((ln for ln in lines if "timeout after" in ln), "timeout")
    elif "MemoryError" in text or "out-of-memory" in text or "malloc(" in text:
        result.finding = "over-limit allocation"
    else:
        result.finding = "crash"
    if not result.detail:
        # The exception line: the first unindented line after the last traceback header.
        starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
        after = lines[starts[-1] + 1 :] if starts else []
        exc = next((ln for ln in after if ln and not ln[0].isspace()), None)
        result.detail = (exc or f"exit status {rc}: {lines[-1] if lines else ''}")[:200]


def _table(results: list[Result], out: Path) -> None:
    head = (
        f"{'target':16} {'executions':>11} {'execs/s':>8} {'cov':>6} {'features':>9} {'corpus':>7} "
        f"{'seconds':>8}  finding"
    )
    print(head)
    for r in results:
        finding = "none" if r.finding is None else f"{r.finding}: {r.detail}"
        print(
            f"{r.target:16} {r.executions:>11} {r.execs_per_s:>8} {r.coverage:>6} {r.features:>9} "
            f"{r.corpus:>7} {r.seconds:>8}  {finding}"
        )
        if r.input:
            print(f"{'':16} input saved: {r.input}")
    print(f"corpus and crashes under {out}")


# ------------------------------------------------------------------------------------------------ child side


def _child(args: argparse.Namespace) -> int:
    import atheris

    for name in THIRD_PARTY:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name in NUMPY_FORMAT:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            for obj in vars(module).values():
                if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                    atheris.instrument_func(obj)
            break
    if args.child.startswith("selftest-"):
        from fuzzing.selftest import target
    else:
        # Instrument on first import: nothing of edgeguard may be imported before this block.
        with atheris.instrument_imports(include=INSTRUMENT):
            from fuzzing.harnesses import target

    spec = target(args.child)
    out: Path = args.out
    with tempfile.TemporaryDirectory(prefix=f"edgeguard-fuzz-{spec.name}-") as scratch:
        harness = spec.build(Path(scratch))
        seeds = out / "seeds" / spec.name
        for s in harness.seeds:
            (seeds / hashlib.sha1(s).hexdigest()).write_bytes(s)
        _bound_address_space(harness.headroom_mb)
        argv = [
            sys.argv[0],
            f"-timeout={args.timeout}",
            f"-max_len={harness.max_len}",
            f"-artifact_prefix={out / 'crashes' / spec.name}/",
            f"-rss_limit_mb={_rss_mb() + 2 * harness.headroom_mb}",  # a backstop; RLIMIT_AS is the bound
            "-print_final_stats=1",
            "-print_pcs=0",
        ]
        if args.seconds:
            argv.append(f"-max_total_time={int(args.seconds)}")
        if args.runs:
            argv.append(f"-runs={args.runs}")
        argv += [str(out / "corpus" / spec.name), str(seeds)]
        kept = ROOT / "tests" / "fuzz" / "regressions" / spec.name  # past findings: replayed first, every run
        if kept.is_dir():
            argv.append(str(kept))
        atheris.Setup(argv, harness.one_input)
        atheris.Fuzz()  # exits the process itself
    return 0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_mb() -> int:
    return _status_kib("VmRSS") // 1024


def _bound_address_space(headroom_mb: int) -> None:
    """Everything set-up mapped (interpreter, libraries, seeds) plus the target's headroom: one input can
    allocate at most the headroom before the allocation fails with MemoryError."""
    limit = _status_kib("VmSize") * 1024 + headroom_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )


def _reproduce(name: str, path: Path) -> int:
    if name.startswith("selftest-"):
        from fuzzing.selftest import target
    else:
        from fuzzing.harnesses import target

    with tempfile.TemporaryDirectory(prefix=f"edgeguard-fuzz-{name}-") as scratch:
        harness = target(name).build(Path(scratch))
        _bound_address_space(harness.headroom_mb)
        harness.one_input(path.read_bytes())  # a finding raises here, with its traceback
    print(f"{name}: {path} handled as documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
