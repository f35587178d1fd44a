"""`edgeguard zoo` and `pack --golden-from`: the shipped example metas seal every zoo model."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from edgeguard import zoo
from edgeguard.bundle import TrustStore, open_bundle
from edgeguard.engine import Engine
from edgeguard.keys import load_device_key
from edgeguard.profiles import get_profile
from tests.cli._run import Result, eg, one_line_error

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("key", sorted(zoo.META))
def test_example_meta_is_the_zoo_meta(key: str) -> None:
    # examples/<key>-meta.json is what publishers copy; init seals with zoo.META: they must not drift.
    assert json.loads((EXAMPLES / f"{key}-meta.json").read_text()) == json.loads(json.dumps(zoo.META[key]))


def test_zoo_list_table_fits_and_json_says_everything(tmp_path: Path) -> None:
    r = eg("zoo", "list", cwd=tmp_path)
    assert r.code == 0, r
    assert max(len(line) for line in r.out.splitlines()) <= 100
    for key in zoo.ITEMS:
        assert any(line.startswith(key + " ") for line in r.out.splitlines()), key
    rows = json.loads(eg("zoo", "list", "--json", cwd=tmp_path).out)
    assert {row["name"] for row in rows} == set(zoo.ITEMS)
    assert all(row["licence"] and row["size"] > 0 and row["does"] for row in rows)


def test_zoo_fetch_copies_verified_file_and_refuses_unknown(tmp_path: Path, astronaut_png: Path) -> None:
    r = eg("zoo", "fetch", "astronaut.png", "-o", tmp_path, cwd=tmp_path)  # a directory keeps the name
    assert r.code == 0, r
    assert (tmp_path / "astronaut.png").read_bytes() == astronaut_png.read_bytes()
    r = eg("zoo", "fetch", "astronaut.png", cwd=tmp_path)
    assert r.code == 0 and Path(r.out.strip()) == astronaut_png, r  # no -o: the cached path
    one_line_error(eg("zoo", "fetch", "resnet50", cwd=tmp_path), 2, "unknown zoo name 'resnet50'", "yolov8n")
    one_line_error(eg("zoo", "fetch", "text.png", "-o", tmp_path / "no" / "x.png", cwd=tmp_path), 2,
                   "does not exist")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for kind in ("publisher", "device"):
        assert eg("keygen", kind, "--out", d, cwd=d).code == 0
    return d


def _pack(keys: Path, model: Path, key: str, out: Path, *extra: object) -> Result:
    return eg("pack", model, "--name", key, "--version", 1, "--sign-key", keys / "publisher.key",
              "--recipient", keys / "device.pub", "--meta", EXAMPLES / f"{key}-meta.json", "-o", out, *extra,
              cwd=out.parent)


@pytest.mark.parametrize("key,photos", [("yolov8n", ("astronaut.png", "chelsea.png")),
                                        ("ppocr-det", ("text.png",)),
                                        ("blazeface", ("astronaut.png",))])
def test_golden_from_images_seals_a_bundle_that_self_tests(
    key: str, photos: tuple[str, ...], keys: Path, tmp_path: Path
) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    for name in photos:
        (images / name).write_bytes(zoo.fetch(name).read_bytes())
    (images / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / f"{key}.egm"
    r = _pack(keys, zoo.fetch(key), key, out, "--golden-from", images)
    assert r.code == 0, r
    opened = open_bundle(out, trust=TrustStore.from_files([keys / "publisher.pub"]),
                         device_key=load_device_key(keys / "device.key"), state_dir=None)
    assert opened.manifest.golden_count == len(photos)
    # Loading runs the self-test against those golden vectors: the images went through the same
    # preprocessing the device applies, and the outputs came from the CPU reference run.
    engine = Engine.load(opened, profile=get_profile("generic-x86_64"))
    try:
        assert engine.health()["accelerator"] is not None
    finally:
        engine.close()


def test_golden_from_refuses_bad_input_with_one_line(keys: Path, tmp_path: Path, astronaut_png: Path) -> None:
    model = zoo.fetch("yolov8n")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(_pack(keys, model, "yolov8n", tmp_path / "a.egm", "--golden-from", empty),
                   2, "no .png/.jpg/.jpeg image")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(astronaut_png, linked / "a.png")  # never followed: a link could point anywhere
    one_line_error(_pack(keys, model, "yolov8n", tmp_path / "b.egm", "--golden-from", linked),
                   2, "a.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one_line_error(_pack(keys, model, "yolov8n", tmp_path / "c.egm", "--golden-from", broken),
                   2, "x.png", "image")
    r = eg("pack", model, "--name", "y", "--version", 1, "--sign-key", keys / "publisher.key", "--recipient",
           keys / "device.pub", "--golden-from", broken, "-o", tmp_path / "d.egm", cwd=tmp_path)
    one_line_error(r, 2, "needs --meta with a 'preprocess' section")
    assert not list(tmp_path.glob("*.egm"))  # nothing half-written


def _fetch_fresh(tmp_path: Path, *, tty: bool) -> str:
    env = dict(os.environ, EDGEGUARD_ZOO_DIR=str(tmp_path / ("tty" if tty else "pipe")))
    argv = [sys.executable, "-m", "edgeguard", "zoo", "fetch", "okay-nabu"]
    if not tty:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=True).stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(180) == 0
    return b"".join(chunks).decode(errors="replace")


def test_zoo_fetch_shows_a_download_bar_on_a_terminal_and_is_quiet_when_piped(tmp_path: Path) -> None:
    # A fresh cache each time, so the wheel is really downloaded (okay-nabu's is the smallest, ~2 MB).
    piped = _fetch_fresh(tmp_path, tty=False)
    assert piped.splitlines() == [str(tmp_path / "pipe" / "d89128c4d16a72de" / "okay_nabu.tflite")], piped
    shown = _fetch_fresh(tmp_path, tty=True)
    assert "fetching okay-nabu (81 kB, Apache-2.0)" in shown and "━" in shown and " MB" in shown, shown
