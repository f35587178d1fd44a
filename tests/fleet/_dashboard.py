"""`edgeguard fleet dashboard` as a child process for tests, a token file, headless chromium, artefacts."""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.fleet._sim import ROOT
from tests.support.broker import MosquittoBroker

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (tools/bootstrap.sh test installs it)


def artifacts(tmp_path: Path, name: str) -> Path:
    """Where screenshots go: $EDGEGUARD_ARTIFACTS/<name> when set (CI keeps it), else the test's tmp dir."""
    base = os.environ.get("EDGEGUARD_ARTIFACTS")
    out = Path(base) / name if base else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


def token_file(directory: Path) -> tuple[Path, str]:
    token = secrets.token_urlsafe(32)
    path = directory / "dashboard.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


class DashboardProc:
    def __init__(self, broker: MosquittoBroker, fleet: str, token: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeguard", "fleet", "dashboard",
             "--broker", f"{broker.host}:{broker.port}", "--fleet", fleet, "--token-file", str(token),
             "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_url(60.0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("dashboard on "):
                return line.split()[2]
        raise AssertionError(f"the dashboard did not start: {''.join(self.output)[-2000:]}")

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.url.rstrip("/") + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                is_json = r.headers.get_content_type() == "application/json"
                return r.status, json.loads(body) if is_json else body
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> DashboardProc:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Debian chromium driven by Playwright (never `playwright install`'s own browsers)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "these tests need Debian's chromium (tools/bootstrap.sh test installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


def login(page: Any, url: str, token: str) -> None:
    """Through the sign-in form a browser gets with its first (401) answer."""
    response = page.goto(url)
    assert response is not None and response.status == 401
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector("#conn[data-state=live]", timeout=60_000)
