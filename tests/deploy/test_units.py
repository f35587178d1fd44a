"""Unit tests of the deploy package's own seams: the chunk gatekeeper (table-driven bad inputs, a hypothesis
round trip), the command's arguments, the slot record and refused list, the link's subtree routing, and the
fetcher on a fake link (the real link and broker are in test_e2e_deploy.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeguard.deploy import (
    BundleMeta,
    ChunkGate,
    ChunkRefused,
    DeployRequest,
    RefusedVersions,
    SlotRecord,
    SlotStore,
    StepHook,
    bundle_messages,
    removal_messages,
)
from edgeguard.deploy._fetch import WINDOW, Fetcher
from edgeguard.errors import CommandRefused, ConfigError
from edgeguard.link._inbound import InboundRouter

SHA = "ab" * 32
P = "edgeguard/v1/f"


def _meta(**over: object) -> bytes:
    doc: dict[str, object] = {"v": 1, "sha256": SHA, "size": 3000, "chunk_size": 1024, "chunks": 3}
    doc.update(over)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "not JSON"),
        (b"[]", "exactly the keys"),
        (_meta(extra=1), "exactly the keys"),
        (_meta(v=2), "version"),
        (_meta(v=True), "version"),
        (_meta(sha256="cd" * 32), "another digest"),
        (_meta(size=2999), "size 2999"),
        (_meta(size="3000"), "not an integer"),
        (_meta(chunk_size=10), "chunk_size"),
        (_meta(chunk_size=2 * 1024 * 1024), "chunk_size"),
        (_meta(chunks=4), "does not fit"),
        (b" " * 600, "bytes"),
    ],
)
def test_bad_meta_is_refused_with_one_line(raw: bytes, why: str) -> None:
    gate = ChunkGate(sha256=SHA, size=3000)
    with pytest.raises(ChunkRefused, match=why):
        gate.accept_meta(raw)
    assert gate.meta is None


@pytest.mark.parametrize(
    ("part", "size", "why"),
    [
        ("3", 952, "beyond"),
        ("-1", 1024, "decimal"),
        ("01", 1024, "decimal"),
        ("1e3", 1024, "decimal"),
        ("meta2", 1024, "decimal"),
        ("0", 1023, "1023 bytes"),
        ("0", 1025, "1025 bytes"),
        ("2", 1024, "1024 bytes"),  # the last chunk holds the remainder, 952
        ("9" * 40, 1024, "decimal"),
    ],
)
def test_bad_chunk_is_refused_before_anything_is_written(part: str, size: int, why: str) -> None:
    gate = ChunkGate(sha256=SHA, size=3000)
    gate.accept_meta(_meta())
    with pytest.raises(ChunkRefused, match=why):
        gate.check_chunk(part, size)


def test_chunk_before_meta_and_meta_changed_midway_are_refused() -> None:
    gate = ChunkGate(sha256=SHA, size=3000)
    with pytest.raises(ChunkRefused, match="before the bundle meta"):
        gate.check_chunk("0", 1024)
    gate.accept_meta(_meta())
    assert gate.check_chunk("2", 952) == 2
    same_size_other_split = ChunkGate(sha256=SHA, size=3000)
    same_size_other_split.accept_meta(_meta())
    with pytest.raises(ChunkRefused, match="changed"):
        same_size_other_split.accept_meta(_meta(chunk_size=1500, chunks=2))


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=1, max_size=20_000), chunk=st.integers(1024, 4096))
def test_writer_and_gate_round_trip(data: bytes, chunk: int) -> None:
    sha = hashlib.sha256(data).hexdigest()
    msgs = list(bundle_messages(P, data, sha, chunk))
    assert msgs[-1][0].endswith("/meta")  # published last: the chunks are retained when it is seen
    gate = ChunkGate(sha256=sha, size=len(data))
    meta = gate.accept_meta(msgs[-1][1])
    out = bytearray(len(data))
    for topic, payload in msgs[:-1]:
        i = gate.check_chunk(topic.rsplit("/", 1)[1], len(payload))
        out[i * meta.chunk_size:i * meta.chunk_size + len(payload)] = payload
    assert bytes(out) == data
    assert [t for t, p in removal_messages(P, sha, meta.chunks) if p == b""] == [t for t, _ in
                                                                                 [msgs[-1], *msgs[:-1]]]


@pytest.mark.parametrize(
    ("args", "check"),
    [
        ({}, "malformed"),
        ({"sha256": SHA.upper(), "size": "10", "source": "mqtt"}, "malformed"),
        ({"sha256": SHA, "size": "0", "source": "mqtt"}, "malformed"),
        ({"sha256": SHA, "size": "010", "source": "mqtt"}, "malformed"),
        ({"sha256": SHA, "size": "99999999999", "source": "mqtt"}, "too large"),
        ({"sha256": SHA, "size": "10", "source": "http://x"}, "malformed"),
        ({"sha256": SHA, "size": "10", "source": "path:relative"}, "malformed"),
        ({"sha256": SHA, "size": "10", "source": "mqtt", "probation_s": "nan"}, "malformed"),
        ({"sha256": SHA, "size": "10", "source": "mqtt", "probation_s": "-1"}, "malformed"),
        ({"sha256": SHA, "size": "10", "source": "mqtt", "max_error_rate": "1.5"}, "malformed"),
        ({"sha256": SHA, "size": "10", "source": "mqtt", "rollout": "a/b"}, "malformed"),
        ({"sha256": SHA, "size": "10", "source": "mqtt", "url": "x"}, "malformed"),
    ],
)
def test_bad_deploy_arguments_are_refused(args: dict[str, str], check: str) -> None:
    with pytest.raises(CommandRefused) as exc:
        DeployRequest.parse(args, max_bytes=1 << 20, default_probation_s=60, max_probation_s=3600)
    assert exc.value.check == check


def test_deploy_arguments_defaults_and_path() -> None:
    req = DeployRequest.parse({"sha256": SHA, "size": "10", "source": "path:/tmp/x.egm", "rollout": "r-1.a"},
                              max_bytes=1 << 20, default_probation_s=60, max_probation_s=3600)
    assert req.source == Path("/tmp/x.egm") and req.probation_s == 60 and req.max_error_rate == 0.05
    assert req.max_p95_ms is None and req.rollout == "r-1.a"


def test_slot_record_round_trips_and_a_corrupt_or_linked_one_is_a_config_error(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    assert store.read() == SlotRecord()  # nothing deployed: model.bundle
    rec = SlotRecord(active="a", previous="config", state="probation", model="m", version=2, time=1.0)
    store.write(rec)
    assert store.read() == rec and store.free_slot(rec) == "b"
    assert (store.record_path.stat().st_mode & 0o777) == 0o600
    store.record_path.write_text('{"active": "c"}')
    with pytest.raises(ConfigError, match="corrupt"):
        store.read()
    store.record_path.unlink()
    store.record_path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ConfigError):
        store.read()


def test_refused_versions_persist_and_a_corrupt_list_is_an_error(tmp_path: Path) -> None:
    refused = RefusedVersions(tmp_path)
    assert refused.reason("m", 2) is None
    refused.add("m", 2, "error rate 1.0")
    assert RefusedVersions(tmp_path).reason("m", 2) == "error rate 1.0"
    assert RefusedVersions(tmp_path).reason("m", 3) is None
    refused.path.write_text("{")
    with pytest.raises(ConfigError, match="corrupt"):
        refused.reason("m", 2)


def test_router_delivers_one_level_of_a_subtree_and_stops_when_removed() -> None:
    router = InboundRouter("edgeguard/v1/f/dev-1/", 100)
    got: list[tuple[str, bytes]] = []
    assert router.add_subtree(f"{P}/bundles/{SHA}/", lambda lv, p: got.append((lv, p)), 50, "meta").endswith(
        "/meta")
    router.add_subtree(f"{P}/bundles/{SHA}/", lambda lv, p: got.append((lv, p)), 50, "+")
    assert router.topics() == [f"{P}/bundles/{SHA}/meta", f"{P}/bundles/{SHA}/+"]
    router.deliver(f"{P}/bundles/{SHA}/0", b"x")
    router.deliver(f"{P}/bundles/{SHA}/0/deeper", b"y")  # not one level below: no handler
    router.deliver(f"{P}/bundles/{SHA}/1", b"z" * 60)  # over the limit
    assert got == [("0", b"x")] and router.dropped == 2
    assert router.remove_subtree(f"{P}/bundles/{SHA}/") == [f"{P}/bundles/{SHA}/meta", f"{P}/bundles/{SHA}/+"]
    router.deliver(f"{P}/bundles/{SHA}/0", b"x")
    assert got == [("0", b"x")] and router.topics() == []
    with pytest.raises(ValueError):
        router.add_subtree(f"{P}/bundles/#/", lambda lv, p: None, 50, "+")


def test_router_unsubscribes_one_filter_of_a_subtree_and_keeps_delivering() -> None:
    router = InboundRouter("edgeguard/v1/f/dev-1/", 100)
    got: list[tuple[str, bytes]] = []
    for level in ("meta", "0", "1", "1"):  # the same filter twice is one filter
        router.add_subtree(f"{P}/bundles/{SHA}/", lambda lv, p: got.append((lv, p)), 50, level)
    assert router.topics() == [f"{P}/bundles/{SHA}/{lv}" for lv in ("meta", "0", "1")]
    assert router.remove_subtree(f"{P}/bundles/{SHA}/", "0") == [f"{P}/bundles/{SHA}/0"]
    assert router.remove_subtree(f"{P}/bundles/{SHA}/", "0") == []  # not subscribed any more
    assert router.remove_subtree(f"{P}/other/", "0") == []
    assert router.topics() == [f"{P}/bundles/{SHA}/meta", f"{P}/bundles/{SHA}/1"]
    router.deliver(f"{P}/bundles/{SHA}/0", b"late")  # in flight when unsubscribed: still delivered
    assert got == [("0", b"late")]


class _FakeLink:
    """Delivers the messages given to it, in the given order, when the fetcher subscribes (as a broker sends
    retained messages), from another thread."""

    def __init__(self, messages: list[tuple[str, bytes]]) -> None:
        self.messages = messages
        self.filters: list[str] = []
        self.open: set[str] = set()
        self.most_open = 0

    def on_fleet_subtree(self, suffix: str, callback: Callable[[str, bytes], None], *, max_bytes: int,
                         level: str = "+", timeout: float | None = None) -> bool:
        self.filters.append(level)
        self.open.add(level)
        self.most_open = max(self.most_open, len(self.open))
        want = [(t.rsplit("/", 1)[1], p) for t, p in self.messages
                if level == "+" or t.rsplit("/", 1)[1] == level]
        threading.Thread(target=lambda: [callback(lv, p) for lv, p in want], daemon=True).start()
        return True

    def off_fleet_subtree(self, suffix: str, level: str | None = None) -> None:
        self.filters.append("off" if level is None else f"off {level}")
        self.open = set() if level is None else self.open - {level}


def test_fetcher_assembles_chunks_skips_duplicates_and_checks_the_digest(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    sha = hashlib.sha256(data).hexdigest()
    msgs = list(bundle_messages(P, data, sha, 1024))
    msgs = msgs[:-1][::-1] + msgs[-1:] + msgs[:3]  # chunks before the meta, and some twice
    f = Fetcher(state_dir=tmp_path, sha256=sha, size=len(data), steps=_off(tmp_path),
                stall_s=30)
    link = _FakeLink(msgs)
    f.fetch_mqtt(link, max_bytes=1 << 20, stop=threading.Event())
    assert f.path.read_bytes() == data and link.filters[0] == "meta" and link.filters[-1] == "off"
    # exact topics only (RabbitMQ hands retained messages to no wildcard), each chunk's once, a window of
    # them at a time, each unsubscribed once its chunk landed
    chunks = [lv for lv in link.filters if not lv.startswith("off") and lv != "meta"]
    assert sorted(chunks, key=int) == [str(i) for i in range(10)], link.filters
    assert link.most_open <= 1 + WINDOW and link.filters.count("off") == 1, link.filters
    # 10 chunks through a window of 8: at least two landed chunks were unsubscribed one by one
    singly = [lv.removeprefix("off ") for lv in link.filters if lv.startswith("off ")]
    assert len(singly) >= 10 - WINDOW and set(singly) <= set(chunks), link.filters
    assert (f.path.stat().st_mode & 0o777) == 0o600


def test_fetcher_refuses_a_wrong_digest_and_removes_the_partial_file(tmp_path: Path) -> None:
    data = b"x" * 5000
    wrong = hashlib.sha256(b"other").hexdigest()
    f = Fetcher(state_dir=tmp_path, sha256=wrong, size=len(data), steps=_off(tmp_path),
                stall_s=30)
    with pytest.raises(CommandRefused) as exc:
        f.fetch_mqtt(_FakeLink(list(bundle_messages(P, data, wrong, 1024))), max_bytes=1 << 20,
                     stop=threading.Event())
    assert exc.value.check == "digest" and not f.path.exists()


def test_fetch_from_a_path_refuses_links_other_files_and_wrong_sizes(tmp_path: Path) -> None:
    data = b"y" * 3000
    sha = hashlib.sha256(data).hexdigest()
    src = tmp_path / "b.egm"
    src.write_bytes(data)
    steps = StepHook(enabled=False, state_dir=tmp_path)
    link = tmp_path / "link.egm"
    link.symlink_to(src)
    for path, check in ((link, "fetch"), (tmp_path, "fetch"), (tmp_path / "missing", "fetch")):
        with pytest.raises(CommandRefused) as exc:
            Fetcher(state_dir=tmp_path, sha256=sha, size=len(data), steps=steps, stall_s=30).fetch_path(path)
        assert exc.value.check == check
    with pytest.raises(CommandRefused) as exc:
        Fetcher(state_dir=tmp_path, sha256=sha, size=len(data) + 1, steps=steps, stall_s=30).fetch_path(src)
    assert exc.value.check == "digest"
    f = Fetcher(state_dir=tmp_path, sha256=sha, size=len(data), steps=steps, stall_s=30)
    f.fetch_path(src)
    assert f.path.read_bytes() == data


def test_fetch_gives_up_when_nothing_new_comes(tmp_path: Path) -> None:
    data = b"z" * 5000
    sha = hashlib.sha256(data).hexdigest()
    ticks = itertools.count()  # the injected clock: one second per reading, so no test waits for the bound
    only_meta = [m for m in bundle_messages(P, data, sha, 1024) if m[0].endswith("/meta")]
    f = Fetcher(state_dir=tmp_path, sha256=sha, size=len(data), steps=_off(tmp_path),
                stall_s=5, clock=lambda: float(next(ticks)))
    with pytest.raises(CommandRefused) as exc:
        f.fetch_mqtt(_FakeLink(only_meta), max_bytes=1 << 20, stop=threading.Event())
    assert exc.value.check == "fetch" and "chunks" in exc.value.detail and not f.path.exists()


def test_meta_for_bundle_bounds() -> None:
    with pytest.raises(ValueError):
        BundleMeta.for_bundle(SHA, 10, chunk_size=100)
    with pytest.raises(ValueError):
        BundleMeta.for_bundle(SHA, 0)


def _off(root: Path) -> StepHook:
    return StepHook(enabled=False, state_dir=root)


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"max_bundle_bytes": 10}, "deploy.max_bundle_bytes"),
        ({"probation_s": -1}, "deploy.probation_s"),
        ({"fetch_stall_s": 0}, "deploy.fetch_stall_s"),
        ({"min_requests": 0}, "deploy.min_requests"),
        ({"bogus": 1}, "deploy.bogus: unknown key"),
    ],
)
def test_bad_deploy_config_is_a_one_line_error_naming_the_key(table: dict[str, object], why: str,
                                                             tmp_path: Path) -> None:
    from edgeguard.service.config import parse_config

    doc = {"device": {"id": "d"}, "model": {"bundle": "m.egm", "trust": ["p.pub"], "device_key": "d.key"},
           "deploy": table}
    with pytest.raises(ConfigError, match=why):
        parse_config(doc, path=tmp_path / "edgeguard.toml")
