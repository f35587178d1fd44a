"""Compatibility legs: the suite's core on the library versions boards really have, each in its own venv.

The main venv holds the newest of everything. Boards often cannot: Coral images stay on tflite-runtime
(built for numpy 1.x), JetPack 6 (Python 3.10) stops at onnxruntime 1.23.2, and the lower bounds in
pyproject.toml are a promise that only an install at exactly those versions can keep. Each leg below builds a
venv under ``.venv-legs/<leg>`` (reused while its requirements and pyproject.toml are unchanged), checks that
the versions it was meant to test are the ones installed (via ``edgeguard doctor --json``), and runs its test
subset. One summary line per leg; any failure, unexpected version or forbidden skip fails the run.

    python tools/legs.py                      every leg, then the aarch64 wheel check
    python tools/legs.py --leg tflite-runtime run one leg (repeatable)
    python tools/legs.py constraints          print the lower-bound constraints made from pyproject.toml
    python tools/legs.py wheels               only the aarch64 wheel check

The wheel check resolves the runtime dependencies for Python 3.10-3.12 on manylinux aarch64 with pip's
resolver (metadata only, nothing installed). pip needs every manylinux tag spelled out: given only
``manylinux2014_aarch64`` it misses wheels tagged ``manylinux_2_28`` and silently picks old versions.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the main venv is 3.11 here; tomli is a dependency on 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
LEGS_DIR = ROOT / ".venv-legs"

# The four subsets the issue names: bundle, engine, processing, and the service end to end.
CORE = ("tests/bundle", "tests/engine", "tests/processing")
SERVICE_E2E = ("tests/service/test_e2e_yolo.py", "tests/service/test_e2e_faults.py",
               "tests/service/test_e2e_bad_input.py")
# Linters run once, in the main venv; the legs need only what the tests import.
NOT_FOR_TESTS = frozenset({"ruff", "mypy"})
MANYLINUX_AARCH64 = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64",
                     "manylinux_2_28_aarch64", "manylinux_2_31_aarch64", "manylinux_2_34_aarch64")


@dataclass(frozen=True)
class Leg:
    name: str
    purpose: str
    pins: tuple[str, ...]  # requirements added to (and overriding) the project's own
    expect: dict[str, str]  # doctor's library report: role -> "library version" prefix that must match
    tests: tuple[str, ...]
    without: frozenset[str] = frozenset()  # dev requirements left out (e.g. the LiteRT interpreter)
    lowest: bool = False  # constrain every requirement to the lower bound pyproject.toml declares
    skips_allowed: bool = True  # False: any skipped test fails the leg


LEGS: tuple[Leg, ...] = (
    Leg("tflite-runtime", "Coral-style: tflite-runtime 2.14 beside numpy 1.26, no ai-edge-litert",
        pins=("numpy==1.26.4", "tflite-runtime==2.14.0"),
        expect={"tflite": "tflite_runtime 2.14.0", "arrays": "numpy 1.26.4"},
        tests=CORE, without=frozenset({"ai-edge-litert"}), skips_allowed=False),
    Leg("jetpack", "JetPack 6-like: onnxruntime 1.23.2 (the newest for Python 3.10 on aarch64), numpy 1.x",
        pins=("onnxruntime==1.23.2", "numpy==1.26.4"),
        expect={"onnx": "onnxruntime 1.23.2", "arrays": "numpy 1.26.4"},
        tests=CORE + SERVICE_E2E),
    Leg("lowest", "every dependency at the lower bound pyproject.toml declares",
        pins=(), expect={}, tests=CORE + SERVICE_E2E, lowest=True),
)


# --- requirements from pyproject.toml ---------------------------------------------------------------------

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert isinstance(project, dict)
    return project


def _requirements() -> tuple[list[str], list[str]]:
    """(runtime dependencies, test dependencies: the dev extra less the linters) from pyproject.toml."""
    project = _project()
    runtime = list(project["dependencies"])
    dev = project["optional-dependencies"]["dev"]
    tests = [r for r in dev if _canonical(_parse(r)[0]) not in NOT_FOR_TESTS]
    return runtime, tests


def _parse(requirement: str) -> tuple[str, str, str]:
    """(name, version specifier, marker) of one requirement string."""
    m = _REQ.match(requirement)
    if m is None:
        raise SystemExit(f"pyproject.toml: cannot read requirement {requirement!r}")
    return m.group(1), m.group(3), (m.group(4) or "")


def lowest_constraints() -> str:
    """A pip constraints file pinning every requirement of pyproject.toml to its declared lower bound.

    Generated, never hand-kept: a bound raised in pyproject.toml is what the lowest leg tests next time. A
    requirement without a ``>=`` bound is an error, because nothing would say which version it promises.
    """
    runtime, tests = _requirements()
    project = _project()
    extras = project["optional-dependencies"]
    lines = ["# generated by tools/legs.py from pyproject.toml: every requirement at its lower bound"]
    seen: dict[str, str] = {}
    for req in [*runtime, *tests, *(r for reqs in extras.values() for r in reqs)]:
        name, spec, marker = _parse(req)
        key = _canonical(name)
        if key in NOT_FOR_TESTS:
            continue
        bound = next((s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")), None)
        if bound is None:
            raise SystemExit(f"pyproject.toml: {req!r} declares no lower bound (>=)")
        if seen.setdefault(key, bound) != bound:
            raise SystemExit(f"pyproject.toml: {name} has two lower bounds ({seen[key]} and {bound})")
        line = f"{name}=={bound}{(' ' + marker) if marker else ''}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines) + "\n"


# --- one leg ----------------------------------------------------------------------------------------------

def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def _install_args(leg: Leg) -> list[str]:
    runtime, tests = _requirements()
    dropped = {_canonical(n) for n in leg.without}
    wanted = [r for r in tests if _canonical(_parse(r)[0]) not in dropped]
    pinned = {_canonical(_parse(p)[0]) for p in leg.pins}
    # A pin replaces the project's requirement on the same package, so pip sees one consistent request.
    reqs = [r for r in [*runtime, *wanted] if _canonical(_parse(r)[0]) not in pinned]
    return ["-e", str(ROOT), *reqs, *leg.pins]


def _fingerprint(leg: Leg, constraints: str) -> str:
    h = hashlib.sha256()
    for part in (sys.version, repr(leg), (ROOT / "pyproject.toml").read_text(), constraints):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _prepare(leg: Leg) -> tuple[Path, str]:
    """The leg's venv, created or reused, and how (for the summary line)."""
    venv = LEGS_DIR / leg.name
    constraints = lowest_constraints() if leg.lowest else ""
    stamp = venv / "edgeguard-leg.sha256"
    fingerprint = _fingerprint(leg, constraints)
    python = venv / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint:
        return venv, "venv reused"
    if venv.exists():
        shutil.rmtree(venv)
    _say(f"leg {leg.name}: creating {venv.relative_to(ROOT)} ({leg.purpose})")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    args = _install_args(leg)
    if leg.lowest:
        cfile = venv / "lowest-constraints.txt"
        cfile.write_text(constraints)
        args += ["-c", str(cfile)]
    subprocess.run([*pip, "--only-binary=:all:", *args], check=True)
    stamp.write_text(fingerprint + "\n")  # written last: a half-built venv is rebuilt next time
    return venv, "venv built"


def _libraries(venv: Path) -> dict[str, dict[str, str | None]]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "edgeguard", "doctor", "--profile",
                          "generic-x86_64", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    libs: dict[str, dict[str, str | None]] = json.loads(out.stdout)["libraries"]
    return libs


def _describe(libs: dict[str, dict[str, str | None]]) -> str:
    return " · ".join(f"{lib['library'] or '(no ' + role + ' library)'} {lib['version'] or ''}".rstrip()
                      for role, lib in libs.items())


def _installed_lowest_mismatches(venv: Path, constraints: str) -> list[str]:
    """Packages of the constraints file installed at another version (pip honours constraints, but a
    marker or a wheel-less version could leave a package out)."""
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json",
                          "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    installed = {_canonical(p["name"]): p["version"] for p in json.loads(out)}
    bad = []
    for line in constraints.splitlines():
        if line.startswith("#") or ";" in line:
            continue
        name, version = line.split("==")
        have = installed.get(_canonical(name))
        if have is not None and _release(have) != _release(version):
            bad.append(f"{name} {have} (lower bound {version})")
    return bad


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.findall(r"\d+", version.split("+", maxsplit=1)[0])[:3]]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


_SUMMARY = re.compile(r"^\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s")


def run_leg(leg: Leg, pytest_args: Sequence[str]) -> tuple[bool, str]:
    start = time.monotonic()
    try:
        venv, how = _prepare(leg)
    except subprocess.CalledProcessError as exc:
        return False, f"leg {leg.name}: FAILED to install ({' '.join(map(str, exc.cmd))[:300]})"
    prepared = time.monotonic() - start
    try:
        libs = _libraries(venv)
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return False, f"leg {leg.name}: FAILED, edgeguard doctor does not run in it: {last[0][:300]}"
    wrong = [f"{role}: {_describe({role: libs[role]})} (wanted {want})" for role, want in leg.expect.items()
             if not _describe({role: libs[role]}).startswith(want)]
    if leg.lowest:
        wrong += _installed_lowest_mismatches(venv, lowest_constraints())
    if wrong:
        return False, f"leg {leg.name}: FAILED, not the versions it is meant to test: {'; '.join(wrong)}"
    _say(f"leg {leg.name}: {_describe(libs)} ({how} in {prepared:.0f} s)")
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", *leg.tests, "-q", "-rs", "-p", "no:cacheprovider",
           *pytest_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    summary = ""
    skipped: list[str] = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("SKIPPED"):
            skipped.append(line.strip())
        if _SUMMARY.match(line.strip("= \n")):
            summary = line.strip("= \n")
    rc = proc.wait()
    took = time.monotonic() - start
    ok = rc == 0 and (leg.skips_allowed or not skipped)
    verdict = "ok" if ok else ("FAILED: skipped tests are not allowed in this leg" if rc == 0 else "FAILED")
    return ok, (f"leg {leg.name}: {verdict} · {summary or _exit_text(rc)} · {_describe(libs)} · "
                f"{took:.0f} s ({how} in {prepared:.0f} s)")


def _exit_text(rc: int) -> str:
    return f"pytest killed by signal {-rc}" if rc < 0 else f"pytest exited {rc} without a summary"


# --- aarch64 wheels ---------------------------------------------------------------------------------------

# (label, Python version, requirements beyond the runtime dependencies): the combinations boards install.
WHEEL_TARGETS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Python 3.10 (JetPack 6)", "3.10", ("ai-edge-litert",)),
    ("Python 3.10 + numpy 1.x", "3.10", ("ai-edge-litert", "numpy<2")),
    ("Python 3.10 + tflite-runtime (Coral)", "3.10", ("tflite-runtime", "numpy<2")),
    ("Python 3.11 (Raspberry Pi OS 12)", "3.11", ("ai-edge-litert",)),
    ("Python 3.12", "3.12", ("ai-edge-litert",)),
)


def check_wheels() -> tuple[bool, list[str]]:
    """Resolve each target's requirements for manylinux aarch64 (pip's resolver, metadata only)."""
    runtime, _ = _requirements()
    ok, lines = True, []
    for label, py, extra in WHEEL_TARGETS:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                   "--disable-pip-version-check", "--ignore-installed", "--only-binary=:all:",
                   "--target", str(Path(tmp) / "t"),
                   "--python-version", py, "--implementation", "cp", "--abi", f"cp{py.replace('.', '')}",
                   *(f"--platform={tag}" for tag in MANYLINUX_AARCH64), "--report", str(report),
                   *runtime, *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                ok = False
                err = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")][:2]
                lines.append(f"wheels aarch64 {label}: FAILED to resolve: {' '.join(err)[:300]}")
                continue
            got = {_canonical(i["metadata"]["name"]): i["metadata"]["version"]
                   for i in json.loads(report.read_text())["install"]}
            shown = ", ".join(f"{n} {got[n]}" for n in ("onnxruntime", "ai-edge-litert", "tflite-runtime",
                                                          "numpy", "cryptography") if n in got)
            lines.append(f"wheels aarch64 {label}: ok · {len(got)} wheels · {shown}")
    return ok, lines


# --- command line -----------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="arguments after -- are passed on to pytest")
    p.add_argument("what", nargs="?", choices=("run", "constraints", "wheels"), default="run")
    p.add_argument("--leg", action="append", choices=[leg.name for leg in LEGS], help="run only this leg")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.pytest_args = argv[split + 1:]  # what follows "--" goes to pytest as it is
    if args.what == "constraints":
        print(lowest_constraints(), end="")
        return 0
    LEGS_DIR.mkdir(exist_ok=True)
    with (LEGS_DIR / ".lock").open("w") as lock:
        # A second run would delete and rebuild venvs the first one is running tests in (seen as SIGBUS).
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another tools/legs.py run ({LEGS_DIR.relative_to(ROOT)}/.lock)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    results: list[tuple[bool, str]] = []
    if args.what == "run":
        extra = list(args.pytest_args)
        for leg in LEGS:
            if args.leg is None or leg.name in args.leg:
                results.append(run_leg(leg, extra))
    if args.what == "wheels" or args.leg is None:
        start = time.monotonic()
        ok, lines = check_wheels()
        results += [(ok, f"{line} ({time.monotonic() - start:.0f} s for all)") for line in lines]
    _say("compatibility legs")
    for _, line in results:
        print(line, flush=True)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
