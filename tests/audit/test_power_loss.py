"""Power loss and crashes: a child process appending records is killed with SIGKILL mid-append, again and
again; every time the chain verifies up to the last complete record, and a torn tail (simulated by cutting
the file at every byte of its last record, as a power cut can) is reported with its place, cut back on the
next start and recorded."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeguard.audit import AuditLog, log_files, parse_line, verify_log
from tests.audit._helpers import write_log

_CHILD = """
import sys
from pathlib import Path
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from edgeguard.audit import AuditConfig, AuditLog
key = load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
log = AuditLog(directory=Path(sys.argv[1]), signing_key=key, device_id="dev-1",
               config=AuditConfig(checkpoint_records=5, max_file_bytes=65536, max_files=4))
i = 0
while True:
    log.append("token-refused", {"i": i, "reason": "invalid token " + "x" * (i % 700)})
    i += 1
"""


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in log_files(directory))


def test_kill_9_mid_append_keeps_a_verifiable_chain(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "sign.key"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    logdir = tmp_path / "audit"
    rng = random.Random(12)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for _round in range(6):
        start = _size(logdir)
        target = start + rng.randrange(2_000, 60_000)  # kill at a random point of the appending
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(logdir), str(pem)], env=env)
        try:
            deadline = time.monotonic() + 60
            while _size(logdir) < target:
                assert child.poll() is None, "the appending child died on its own"
                assert time.monotonic() < deadline, "the child did not append"
                time.sleep(0.001)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        report = verify_log(directory=logdir, pub=key.public_key())
        assert report.ok, report.problems  # up to the last complete record (a torn tail is only reported)
    final = AuditLog(directory=logdir, signing_key=key, device_id="dev-1")
    final.stop()
    report = verify_log(directory=logdir, pub=key.public_key())
    assert report.ok and report.torn is None, report.problems
    assert report.records > 100


def test_a_record_torn_at_any_byte_is_located_cut_and_recorded(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    src = tmp_path / "src"
    write_log(src, key, 8)
    whole = log_files(src)[0].read_bytes()
    lines = whole.splitlines(keepends=True)
    body = b"".join(lines[:-1])
    last = lines[-1]
    for cut in range(1, len(last), 7):  # every 7th byte of the last record (and its newline at the end)
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "audit-000001.log").write_bytes(body + last[:cut])
        report = verify_log(directory=d, pub=key.public_key())
        assert report.ok and report.torn is not None, (cut, report.problems)
        assert f"line {len(lines)}" in report.torn and f"after record {len(lines) - 2}" in report.torn
        log = AuditLog(directory=d, signing_key=key, device_id="dev-1")
        log.stop()
        recs = [parse_line(x) for x in (d / "audit-000001.log").read_bytes().splitlines()]
        assert all(r is not None for r in recs)
        torn = [r for r in recs if r is not None and r.kind == "audit-torn"]
        assert len(torn) == 1 and torn[0].data["bytes_cut"] == cut and torn[0].seq == len(lines) - 1
        assert verify_log(directory=d, pub=key.public_key()).ok
