"""Verifying an audit log: the only reader of audit files that decides whether they can be believed.

Checks, in this order, each before what relies on it:

1. every line is a whole record in canonical form whose ``hash`` matches its content (a modified record is
   named by its position);
2. the records run on without a gap: ``seq`` goes up by one and ``prev`` is the previous record's ``hash``,
   across files too (a deleted, inserted or reordered record breaks this right there);
3. the chain starts at record 0 from the genesis hash, or exactly where a signed ``audit-retention`` record
   says older records were dropped (deleting the oldest records by hand is not a retention);
4. every ``audit-checkpoint`` is signed by the device key given and names the head just before it;
5. the log reaches the newest signed checkpoint known from anywhere: in the log, in ``checkpoint.json``, or
   captured from MQTT (``--from-mqtt-capture``): a log cut before it was truncated.

A cut at the very end that is not a whole line (a torn record after a power cut) is reported, not treated as
tampering, when it lies beyond the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeguard.keys import public_key_id

from ._log import CHECKPOINT_FILE, checkpoint_payload, log_files, parse_line
from ._record import GENESIS, MAX_LINE_BYTES, Record

__all__ = ["Problem", "Report", "verify_log", "verify_lines", "checkpoints_from_capture", "check_checkpoint"]

MAX_CAPTURE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    where: str  # "audit-000001.log line 12"
    seq: int | None  # the record's position in the chain (counting from the first record read), if known
    reason: str

    def __str__(self) -> str:
        at = f"record {self.seq} ({self.where})" if self.seq is not None else self.where
        return f"{at}: {self.reason}"


@dataclass
class Report:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str = GENESIS
    checkpoints: int = 0
    covered: int = 0  # records covered by the newest valid signed checkpoint
    torn: str | None = None  # where a torn tail was found (not tampering)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "head": self.head, "checkpoints": self.checkpoints,
                "covered": self.covered, "torn": self.torn, "problems": [str(p) for p in self.problems]}


def check_checkpoint(data: Any, pub: Ed25519PublicKey) -> str | None:
    """None if ``data`` is a checkpoint signed by ``pub``, else why not."""
    if not isinstance(data, dict):
        return "not a checkpoint"
    try:
        payload = checkpoint_payload(device=str(data["device"]), head=str(data["head"]),
                                     count=int(data["count"]), time=str(data["time"]),
                                     key_id=str(data["key_id"]))
        sig = bytes.fromhex(str(data["sig"]))
    except (KeyError, ValueError, TypeError):
        return "checkpoint fields missing or malformed"
    if data["key_id"] != public_key_id(pub):
        return f"checkpoint signed by key {str(data['key_id'])[:16]!r}, not by the key given"
    try:
        pub.verify(sig, payload)
    except InvalidSignature:
        return "checkpoint signature does not verify"
    return None


def checkpoints_from_capture(path: Path) -> list[dict[str, Any]]:
    """``audit-checkpoint`` events from a capture of the ``events`` topic: one message per line, either the
    JSON payload alone or ``TOPIC PAYLOAD`` (``mosquitto_sub -v``)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_CAPTURE_BYTES + 1)
    if len(raw) > MAX_CAPTURE_BYTES:
        raise ValueError(f"capture {path} is larger than {MAX_CAPTURE_BYTES} bytes")
    found = []
    for line in raw.splitlines():
        brace = line.find(b"{")
        if brace < 0:
            continue
        try:
            doc = json.loads(line[brace:])
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("kind") == "audit-checkpoint":
            cp = doc.get("checkpoint")
            if isinstance(cp, dict):
                found.append({k: cp.get(k) for k in ("device", "head", "count", "time", "key_id", "sig")})
    return found


def verify_log(
    files: list[Path] | None = None,
    *,
    directory: Path | None = None,
    pub: Ed25519PublicKey,
    external: Iterable[dict[str, Any]] = (),
) -> Report:
    """Verify the log files (or every log file in ``directory``) against ``pub``. ``external``: checkpoints
    known from elsewhere (``checkpoint.json`` in ``directory`` is added, MQTT captures)."""
    extra = list(external)
    if files is None:
        if directory is None:
            raise ValueError("give files or a directory")
        files = log_files(directory)
        cp = directory / CHECKPOINT_FILE
        if cp.is_file():
            with contextlib.suppress(ValueError):  # an unreadable one proves nothing either way
                extra.append(json.loads(cp.read_bytes()[:MAX_LINE_BYTES]))
    lines: list[tuple[str, bytes]] = []
    for path in files:
        data = path.read_bytes()
        parts = data.split(b"\n")
        for i, line in enumerate(parts):
            if i == len(parts) - 1:
                if line:
                    lines.append((f"{path.name} line {i + 1}", line + b"\x00torn"))  # no newline: torn
                break
            lines.append((f"{path.name} line {i + 1}", line))
    return verify_lines(lines, pub=pub, external=extra)


def verify_lines(
    lines: list[tuple[str, bytes]], *, pub: Ed25519PublicKey, external: Iterable[dict[str, Any]] = ()
) -> Report:
    rep = Report()
    prev: Record | None = None
    retention_starts: dict[int, str] = {}
    newest_cp: dict[str, Any] | None = None
    hashes: dict[int, str] = {}
    # A damaged tail is a torn write only if every line from it on is damaged (power loss cuts the end, it
    # does not leave good records after bad ones).
    last_good_index = max((i for i, (_, ln) in enumerate(lines) if parse_line(ln) is not None), default=-1)
    for index, (where, line) in enumerate(lines):
        rec = parse_line(line)
        expect = 0 if prev is None else prev.seq + 1
        if rec is None:
            if index > last_good_index:
                rep.torn = f"{where}: incomplete record after record {rep.last_seq} (power loss or crash)"
                break
            rep.problems.append(Problem(where, expect, "not a valid record: modified, inserted or corrupt"))
            break
        if prev is None:
            rep.first_seq = rec.seq
        elif rec.seq != prev.seq + 1:
            what = "deleted or moved" if rec.seq > prev.seq + 1 else "inserted or reordered"
            rep.problems.append(Problem(where, expect, f"expected record {expect}, found record {rec.seq}: "
                                        f"records {what}"))
            break
        elif rec.prev != prev.hash:
            rep.problems.append(Problem(where, rec.seq, f"does not chain to record {prev.seq} (record "
                                        f"{prev.seq} or {rec.seq} modified, or one replaced)"))
            break
        if rec.kind == "audit-retention":
            try:
                retention_starts[int(rec.data["through_seq"]) + 1] = str(rec.data["head"])
            except (KeyError, ValueError, TypeError):
                rep.problems.append(Problem(where, rec.seq, "malformed retention record"))
                break
        if rec.kind == "audit-checkpoint":
            why = check_checkpoint(rec.data, pub)
            if why is None and (rec.data["head"] != rec.prev or rec.data["count"] != rec.seq):
                why = "checkpoint does not name the head before it"
            if why is not None:
                rep.problems.append(Problem(where, rec.seq, why))
                break
            rep.checkpoints += 1
            newest_cp = rec.data
        hashes[rec.seq] = rec.hash
        prev = rec
        rep.records += 1
        rep.last_seq, rep.head = rec.seq, rec.hash
    # 3. where the chain starts (checked even after a break: a record moved to the front is named there)
    first = parse_line(lines[0][1]) if lines else None
    if first is not None:
        start: Problem | None = None
        if first.seq == 0:
            if first.prev != GENESIS:
                start = Problem(lines[0][0], 0, "the first record does not start the chain")
        elif retention_starts.get(first.seq) != first.prev:
            # Named: the record that should be first (0, or where the latest retention says the log starts).
            expected = max(retention_starts, default=0)
            start = Problem(lines[0][0], expected,
                            f"the log starts at record {first.seq} but no signed retention record dropped "
                            "the ones before it: records deleted")
        if start is not None:
            rep.problems.insert(0, start)
    # 5. the newest checkpoint known anywhere must be reached
    for cp in external:
        if check_checkpoint(cp, pub) is not None:
            continue  # an unsigned or foreign checkpoint proves nothing either way
        if newest_cp is None or int(cp["count"]) > int(newest_cp["count"]):
            newest_cp = cp
        elif int(cp["count"]) <= (rep.last_seq if rep.last_seq is not None else -1) and hashes.get(
                int(cp["count"]) - 1, cp["head"]) != cp["head"]:
            rep.problems.append(Problem("checkpoint", int(cp["count"]) - 1,
                                        "differs from a signed checkpoint published earlier: rewritten"))
    if newest_cp is not None and not rep.problems:
        count = int(newest_cp["count"])
        rep.covered = count
        last = rep.last_seq if rep.last_seq is not None else -1
        if last < count - 1:
            rep.problems.append(Problem(
                "end of log", last + 1,
                f"the log ends after record {last}, but a signed checkpoint ({newest_cp['time']}) covers "
                f"{count} records: truncated"))
        elif count > 0 and hashes.get(count - 1, newest_cp["head"]) != newest_cp["head"]:
            rep.problems.append(Problem("checkpoint", count - 1,
                                        "record differs from the signed checkpoint's head: rewritten"))
    return rep
