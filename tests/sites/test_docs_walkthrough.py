"""docs/sites.md's walkthrough, run as written: its [site] table on two real device services, its Python on a
real mosquitto, then ``fleet status --groups --json`` as an operator would run it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.sites._site import make_device
from tests.support.broker import MosquittoBroker
from tests.support.slowdown import scaled

DOC = Path(__file__).resolve().parents[2] / "docs" / "sites.md"


def _block(lang: str) -> str:
    text = DOC.read_text()
    walk = text[text.index("## Walkthrough") : text.index("## Group input")]
    found = re.search(rf"```{lang}\n(.*?)```", walk, re.S)
    assert found is not None, f"no {lang} block in the walkthrough"
    return found.group(1)


def _groups(port: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeguard",
            "fleet",
            "status",
            "--broker",
            f"127.0.0.1:{port}",
            "--fleet",
            "test",
            "--groups",
            "--json",
            "--wait",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {"rc": out.returncode, **json.loads(out.stdout)}


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    site, code = _block("toml"), _block("python")
    with MosquittoBroker(tmp_path / "broker") as broker:
        devs = [make_device(tmp_path / d, broker, d, site=site) for d in ("dev-a", "dev-b")]
        for d in devs:
            d.start()
        try:
            for d in devs:
                d.wait_ready()
            scope: dict = {"PORT": broker.port}
            exec(compile(code, str(DOC), "exec"), scope)
            assert scope["served_by"] <= {"dev-a", "dev-b"} and scope["served_by"]
            end = time.monotonic() + scaled(60)
            while True:
                report = _groups(broker.port)
                groups = report["groups"]
                if groups and len(groups[0]["members"]) == 2 and groups[0]["streams"]:
                    break
                assert time.monotonic() < end, report
            [g] = groups
            assert g["group"] == "line-1" and sorted(g["joined"]) == ["dev-a", "dev-b"]
            assert g["streams"]["cam-1"]["holder"] == "dev-a" and report["rc"] == 0
            assert abs(sum(v for v in g["load"].values() if v is not None) - 1.0) < 0.01
        finally:
            for d in devs:
                d.stop()
