"""Starting the service: the worker's entry point, ``run --check`` (everything a start would load), and the
supervisor's crash-loop bookkeeping across separate runs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeguard.service._state import Failure, SupervisorState, read_state, write_state
from edgeguard.service.config import SupervisorSection
from tests.service._env import Device, tiny_bundle
from tests.service.test_supervisor import FAST, Harness
from tests.support.broker import MosquittoBroker


def test_worker_start_prints_no_runtime_warning(tmp_path: Path) -> None:
    # `python -m edgeguard.service.<worker module>` must not find that module already imported by the
    # package (runpy then runs a second copy and warns on every worker start).
    with MosquittoBroker(tmp_path) as broker:
        dev = Device(root=tmp_path, broker=broker)
        dev.provision(tiny_bundle(tmp_path))
        dev.start()
        try:
            dev.wait_ready()
        finally:
            assert dev.stop() == 0
    log = (tmp_path / "service.log").read_text()
    assert "edgeguard[worker" in log  # the worker did start and log
    assert "RuntimeWarning" not in log, log


def test_supervisor_does_not_import_the_worker_stack() -> None:
    # The supervisor only spawns and watches: it must not load the worker's modules (and with them the
    # inference and network libraries) into the process that has to stay small and alive.
    code = (
        "import sys; import edgeguard.service._supervisor, edgeguard.service._run; "
        "print(sorted(m for m in sys.modules if m.startswith('edgeguard.service._w')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_failures_of_an_earlier_run_do_not_count_towards_a_crash_loop(tmp_path: Path) -> None:
    # An earlier, separate run crash-looped a moment ago (a bad config, since fixed) and left its failures
    # in the state file. A fresh start that fails once must restart and serve, not enter the safe state.
    now = time.time()
    earlier = SupervisorState(first_start=now - 30, starts=3, failures=2)
    earlier.history = [Failure(at=now - 5, reason="crash: x"), Failure(at=now - 2, reason="crash: y")]
    write_state(tmp_path / "state.json", earlier)
    settings = SupervisorSection(**FAST, crash_loop_restarts=3, crash_loop_window_s=600)
    h = Harness(tmp_path, "crash-on-start:1", settings, count=True)
    with h:
        assert h.wait(
            lambda: any(e["event"] == "start" and e["behaviour"] == "ok" for e in h.events())
        ), h.events()
        assert h.wait(lambda: h.sup.state.repaired >= 1)  # the replacement reported ready
        assert [e["mode"] for e in h.events() if e["event"] == "start"] == ["serve", "serve"]
        assert not h.sup.state.safe_state and h.sup.mode == "serve"
    st = read_state(tmp_path / "state.json")
    assert st.failures == 3 and len(st.history) == 3  # the record (MTBF) keeps every failure
    assert not st.safe_state


# ------------------------------------------------------------------------------------------- run --check
def _check(dev: Device) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeguard", "run", "--check", "-c", str(dev.config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _provisioned(tmp_path: Path) -> Device:
    broker = MosquittoBroker(tmp_path, start=False)  # --check needs the broker's address, not the broker
    dev = Device(root=tmp_path, broker=broker)
    dev.provision(tiny_bundle(tmp_path))
    return dev


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _link_host(dev: Device, host: str) -> None:
    head, sep, link = dev.config.read_text().partition("[link]")
    dev.config.write_text(head + sep + link.replace('host = "127.0.0.1"', f'host = "{host}"', 1))


# Each case breaks one thing a start needs; --check must name the config key that points at it.
BROKEN: list[tuple[str, Callable[[Device], None], str, str]] = [
    ("tokens file missing", lambda d: (d.root / "tokens").unlink(), "sources.api.tokens_file", "not found"),
    ("tokens file group-readable", lambda d: (d.root / "tokens").chmod(0o640), "sources.api.tokens_file",
     "group"),
    ("a short token", lambda d: (d.root / "tokens").write_text("app infer short\n"),
     "sources.api.tokens_file",
     "shorter than"),
    ("bundle missing", lambda d: (d.root / "model.egm").unlink(), "model.bundle", "not found"),
    ("bundle tampered", lambda d: _flip_a_byte(d.root / "model.egm"), "model.bundle", "bundle rejected"),
    ("device key group-readable", lambda d: (d.root / "keys/device.key").chmod(0o640), "model.device_key",
     "too open"),
    ("device key missing", lambda d: (d.root / "keys/device.key").unlink(), "model.device_key", "not found"),
    ("trust key missing", lambda d: (d.root / "keys/publisher.pub").unlink(), "model.trust", "not found"),
    ("TLS CA file missing", lambda d: d.config.write_text(d.config.read_text() + '\nca_file = "nope.pem"\n'),
     "link.ca_file", "nope.pem"),
    ("broker name does not resolve", lambda d: _link_host(d, "no-such-broker.invalid"), "link.host",
     "no-such-broker.invalid"),
]


@pytest.mark.parametrize(("break_it", "key", "words"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_check_names_the_key_of_what_a_start_would_trip_on(
    tmp_path: Path, break_it: Callable[[Device], None], key: str, words: str
) -> None:
    dev = _provisioned(tmp_path)
    break_it(dev)
    done = _check(dev)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, lines
    assert f": {key}: " in lines[0] and words in lines[0], lines


def test_check_lists_every_problem_one_line_each(tmp_path: Path) -> None:
    dev = _provisioned(tmp_path)
    (dev.root / "tokens").chmod(0o644)
    (dev.root / "model.egm").unlink()
    done = _check(dev)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert any(": sources.api.tokens_file: " in ln for ln in lines)
    assert any(": model.bundle: " in ln for ln in lines)


def test_check_passes_a_good_config_without_committing_the_rollback_floor(tmp_path: Path) -> None:
    dev = _provisioned(tmp_path)
    done = _check(dev)
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout and "sensor v1" in done.stdout, done.stdout
    assert not (dev.state / "rollback").exists() or not any((dev.state / "rollback").iterdir())


def test_check_under_and_outside_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeguard.service import load_config
    from edgeguard.service._check import check_startup

    dev = _provisioned(tmp_path)
    text = dev.config.read_text()
    text = text.replace('device_key = "keys/device.key"', 'device_key_credential = "device-key"')
    dev.config.write_text(text.replace('tokens_file = "tokens"', 'tokens_credential = "api-tokens"'))
    cfg = load_config(dev.config)
    # From a shell: the credentials cannot be seen; said so, not reported as a problem.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    problems, passed = check_startup(cfg)
    assert problems == []
    assert any("not checked: model.device_key_credential" in p for p in passed), passed
    assert any("not checked: sources.api.tokens_credential" in p for p in passed), passed
    # Inside the unit: the credentials are read like files, with the same checks.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "device-key").write_bytes((tmp_path / "keys/device.key").read_bytes())
    (creds / "device-key").chmod(0o600)
    (creds / "api-tokens").write_bytes((tmp_path / "tokens").read_bytes())
    (creds / "api-tokens").chmod(0o644)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    problems, passed = check_startup(cfg)
    assert [p.key for p in problems] == ["sources.api.tokens_credential"], problems
    assert any("sensor v1 verified" in p for p in passed), passed
