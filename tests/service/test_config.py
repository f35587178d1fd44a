"""Typed config: the documented example parses; unknown keys and wrong types name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from edgeguard.errors import ConfigError
from edgeguard.link import LinkConfig
from edgeguard.outbox import OutboxConfig
from edgeguard.service import config as c
from edgeguard.service import load_config, parse_config
from edgeguard.sites import SiteConfig, StreamBinding

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "edgeguard.toml"

SECTIONS = {
    "device": c.DeviceSection,
    "model": c.ModelSection,
    "service": c.SupervisorSection,
    "watchdog": c.WatchdogSection,
    "sources.api": c.ApiSection,
    "sources.api.budget": c.BudgetSection,
    "sources.mqtt": c.MqttInputSection,
    "sources.serial": c.SerialSection,
    "sources.directory": c.DirectorySection,
    "outbox": OutboxConfig,
    "link": LinkConfig,
    "site": SiteConfig,
    "site.streams": StreamBinding,
}


def test_example_parses() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.device.id == "cam-01" and cfg.model.device_key_credential == "device-key"
    assert cfg.api.tokens_credential == "api-tokens" and cfg.service.crash_loop_restarts == 5
    assert cfg.outbox.max_count == 1_000_000 and cfg.link.host == "127.0.0.1"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_is_in_the_example_and_the_docs(section: str) -> None:
    example = EXAMPLE.read_text()
    docs = (ROOT / "docs" / "service.md").read_text()
    for f in dataclasses.fields(SECTIONS[section]):
        assert re.search(rf"^#?\s*{f.name}\s*=", example, re.M), f"{section}.{f.name} missing in the example"
        assert f"`{f.name}`" in docs, f"{section}.{f.name} missing in docs/service.md"


BASE = '[device]\nid = "d"\n[model]\nbundle = "m.egm"\ntrust = ["p.pub"]\ndevice_key = "k"\n'

BAD = [
    (BASE + "[colour]\n", "colour: unknown section"),
    (BASE.replace('id = "d"', 'id = "d"\nname = "x"'), "device.name: unknown key"),
    (BASE.replace('id = "d"', "id = 5"), "device.id: must be a string, got 5"),
    (BASE.replace('id = "d"', 'id = "a/b"'), "device.id: 1..64 of"),
    (BASE.replace('trust = ["p.pub"]', 'trust = "p.pub"'), "model.trust: must be an array"),
    (BASE.replace('device_key = "k"', ""), "model.device_key: give exactly one"),
    (BASE + "[service]\nhang_timeout_s = true\n", "service.hang_timeout_s: must be a number, got True"),
    (BASE + "[service]\nliveness_s = 5\nhang_timeout_s = 6\n", "service.hang_timeout_s: must be >= 2 x"),
    (BASE + "[service]\ncrash_loop_restarts = 1.5\n", "service.crash_loop_restarts: must be an integer"),
    (BASE + '[watchdog]\ndevice_nowayout = "maybe"\n', "watchdog.device_nowayout: must be one of"),
    (BASE + '[sources.api]\ntokens_file = "t"\nhost = "0.0.0.0"\n', "not a loopback address"),
    (BASE + "[sources.api]\nport = 80\n", "sources.api.tokens_file: give exactly one"),
    (BASE + "[sources.ftp]\n", "sources.ftp: unknown source"),
    (BASE + "[sources.serial]\nenabled = true\n", "sources.serial: serial port must be given"),
    (BASE + "[sources.mqtt]\nenabled = true\nmax_body_bytes = 999999\n", "exceeds link.inbound_max_bytes"),
    (BASE + "[outbox]\nmax_count = 0\n", "outbox.max_count: must be"),
    (BASE + "[outbox]\nbogus = 1\n", "outbox.bogus: unknown key"),
    (BASE + "[link]\nport = 0\n", "link.port: must be 1..65535"),
    (BASE + '[link]\nprotocol = "4"\n', "link.protocol: must be one of"),
    (BASE + "[sources.api.budget]\nrate_per_s = -1\n", "sources.api.budget: rate_per_s must be 0 (off)"),
    (BASE + '[sources.api.budget]\nwindow_queries = "many"\n',
     "sources.api.budget.window_queries: must be an integer"),
    (BASE + "[sources.api.budget]\nburst = 5\n", "sources.api.budget: burst needs a rate_per_s"),
    (BASE + "[sources.api.budget]\nspeed = 5\n", "sources.api.budget.speed: unknown key"),
    (BASE + "[sources.api.budget.tokens.app]\nburst = 5.5\n",
     "sources.api.budget.tokens.app.burst: must be an integer"),
    (BASE + "[sources.api.budget]\ntokens = 3\n", "sources.api.budget.tokens: must be a table"),
    (BASE + "[sources.api]\nbudget = 3\n", "sources.api.budget: must be a table"),
    (BASE + '[site]\nenabled = true\ngroup = "a b"\n', "site.group: must be 1..64"),
    (BASE + '[link]\nprotocol = "3.1.1"\n[site]\nenabled = true\ngroup = "g"\n', "needs MQTT 5 shared"),
]


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_bad_configs(tmp_path: Path, text: str, reason: str) -> None:
    p = tmp_path / "e.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert reason in str(info.value)


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "device": {"id": "d", "state_dir": "state"},
            "model": {"bundle": "m.egm", "trust": ["a.pub"], "device_key": "/abs/k"},
        },
        path=tmp_path / "x.toml",
    )
    assert cfg.device.state_dir == tmp_path / "state" and cfg.model.trust == (tmp_path / "a.pub",)
    assert cfg.model.device_key == Path("/abs/k")


def test_malformed_toml(tmp_path: Path) -> None:
    p = tmp_path / "e.toml"
    p.write_text("[device\n")
    with pytest.raises(ConfigError, match=r"e\.toml"):
        load_config(p)
