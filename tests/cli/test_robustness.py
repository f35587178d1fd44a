"""`edgeguard robustness` and `edgeguard pack --adversarial` as real child processes: the robustness run on
the built-in digits classifier end to end (small sample: fast) with its JSON report and PNG plot; packing
calibrates and signs the detector's declaration; bad arguments are one-line usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from edgeguard.keys import generate_keypair
from tests.cli._run import eg, one_line_error
from tests.support.digits import digits_case


def test_robustness_runs_end_to_end_and_writes_the_plot(tmp_path: Path) -> None:
    plot = tmp_path / "robustness.png"
    r = eg("robustness", "digits", "--samples", "40", "--eps", "0.1,0.3", "--spsa-samples", "8",
           "--pgd-steps", "3", "--plot", plot, "--json", cwd=tmp_path, timeout=300)
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["test_samples"] == 40 and report["calibration_samples"] == 359
    assert report["clean_accuracy"] > 0.9  # a real classifier on real data
    assert 0.0 < report["threshold"] <= 2.0 and 0.0 <= report["clean_fpr"] <= 1.0
    rows = {(row["attack"], row["eps"]): row for row in report["rows"]}
    assert set(rows) == {("fgsm", 0.1), ("fgsm", 0.3), ("pgd", 0.1), ("pgd", 0.3)}
    for row in rows.values():
        assert row["accuracy"] <= report["clean_accuracy"]
        assert 0 <= row["detected"] <= row["successful"] <= 40
    # A larger eps is a stronger attack: accuracy does not rise.
    assert rows[("pgd", 0.3)]["accuracy"] <= rows[("pgd", 0.1)]["accuracy"]
    assert set(report["goal"]) == {"fgsm", "pgd"} and isinstance(report["goal"]["pgd"]["met"], bool)
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == (720, 420)
        assert len(img.convert("RGB").getcolors(1 << 16) or []) > 10  # lines were drawn, not a blank page


def test_robustness_table_names_the_goal(tmp_path: Path) -> None:
    r = eg("robustness", "digits", "--samples", "20", "--eps", "0.2", "--attacks", "pgd", "--spsa-samples",
           "8", "--pgd-steps", "2", cwd=tmp_path, timeout=300)
    assert r.code == 0, r.err
    assert "detection rate" in r.out and "goal (>= 0.80 detection at <= 0.05 FPR) for pgd" in r.out


def test_robustness_bad_arguments_are_one_line_usage_errors(tmp_path: Path) -> None:
    one_line_error(eg("robustness", "digits", "--eps", "0.1,x", cwd=tmp_path), 2, "--eps")
    one_line_error(eg("robustness", "digits", "--attacks", "cw", cwd=tmp_path), 2, "--attacks")
    (tmp_path / "d.npz").write_bytes(b"not an npz")
    one_line_error(eg("robustness", "digits", "--data", tmp_path / "d.npz", cwd=tmp_path), 2)


def test_pack_adversarial_calibrates_and_signs_the_declaration(tmp_path: Path) -> None:
    case = digits_case()
    generate_keypair("publisher", tmp_path / "keys")
    generate_keypair("device", tmp_path / "keys")
    (tmp_path / "digits.onnx").write_bytes(case.model)
    meta = {k: v for k, v in case.meta().items() if k != "defence"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "clean.npz", x=case.calibration.x)
    np.savez(tmp_path / "golden.npz", **{"0/in/x": case.test.x[:1]})
    common = ["pack", "digits.onnx", "--name", "digits", "--version", "1",
              "--sign-key", "keys/publisher.key", "--recipient", "keys/device.pub",
              "--meta", "meta.json", "--golden", "golden.npz"]
    r = eg(*common, "--adversarial", "reject", "--adversarial-data", "clean.npz",
           "--adversarial-bits", "3", "--adversarial-median", "0", "-o", "d.egm", cwd=tmp_path)
    assert r.code == 0, r.err
    shown = eg("inspect", "d.egm", cwd=tmp_path)
    decl = json.loads(shown.out)["manifest"]["defence"]["adversarial"]
    assert decl["mode"] == "reject" and decl["fpr"] == 0.05
    assert decl["calibrated_on"] == len(case.calibration.y)
    assert 0 < decl["threshold"] < 2 and decl["bits"] == 3 and decl["median"] == 0
    # Too few clean samples for the rate (one golden input): refused before anything is sealed.
    r = eg(*common, "--adversarial", "flag", "-o", "e.egm", cwd=tmp_path)
    one_line_error(r, 2, "clean samples")
    assert not (tmp_path / "e.egm").exists()


def test_infer_reports_the_score_and_a_bad_declaration_is_a_malformed_bundle(tmp_path: Path) -> None:
    from tests.service._env import seal

    case = digits_case()
    np.save(tmp_path / "digit.npy", case.test.x[:1])
    trust = ["--trust", "keys/publisher.pub", "--device-key", "keys/device.key"]
    good = seal(tmp_path, case.model, name="digits", version=1, meta=case.meta("flag"),
                golden_in={"x": case.test.x[:1]})
    (tmp_path / "good.egm").write_bytes(good)
    r = eg("infer", "--bundle", "good.egm", *trust, "digit.npy", "--json", cwd=tmp_path)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert isinstance(doc["adversarial_score"], float) and doc["adversarial"] in (True, False)
    meta = case.meta("flag")
    meta["defence"]["adversarial"]["mode"] = "block"
    bad = seal(tmp_path, case.model, name="digits", version=2, meta=meta, golden_in={"x": case.test.x[:1]})
    (tmp_path / "bad.egm").write_bytes(bad)
    one_line_error(eg("infer", "--bundle", "bad.egm", *trust, "digit.npy", cwd=tmp_path), 3,
                   "malformed", "defence.adversarial.mode")


def test_robustness_on_an_image_directory_uses_the_meta_preprocess(tmp_path: Path, page_png: Path) -> None:
    """DIR/<class>/<image>: real text-line crops of page.png, upright (0/) and turned (1/), through the
    device's own preprocessing as --meta declares it, attacked on the real PP-OCR orientation classifier."""
    from PIL import Image

    page = Image.open(page_png).convert("RGB")
    for label in ("0", "1"):
        (tmp_path / "lines" / label).mkdir(parents=True)
    for i, (top, bottom) in enumerate([(51, 63), (69, 81), (86, 99), (103, 118), (120, 135)] * 3):
        crop = page.crop((20 + 60 * (i // 5), top - 2, 84 + 60 * (i // 5), bottom + 2))  # ~4:1, as PP-OCR

        crop.save(tmp_path / "lines" / "0" / f"{i}.png")
        crop.rotate(180).save(tmp_path / "lines" / "1" / f"{i}.png")
    (tmp_path / "lines" / "notes.txt").write_text("not a class")
    meta = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 48, 192], "range": [-1.0, 1.0]}],
            "preprocess": {"size": [48, 192], "anchor": "top_left", "pad_value": 127,
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    r = eg("robustness", "ppocr-cls", "--data", tmp_path / "lines", "--meta", "meta.json", "--samples", "6",
           "--eps", "0.3", "--attacks", "fgsm", "--spsa-samples", "4", "--fpr", "0.1", "--median", "2",
           "--json", cwd=tmp_path, timeout=300)
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["calibration_samples"] == 15 and report["test_samples"] == 6
    assert report["clean_accuracy"] >= 0.5 and report["squeezers"]["median"] == 2
    one_line_error(eg("robustness", "ppocr-cls", "--data", tmp_path / "lines", cwd=tmp_path), 2, "--meta")


def test_robustness_search_chooses_the_squeezers_on_the_calibration_split(tmp_path: Path) -> None:
    r = eg("robustness", "digits", "--samples", "30", "--eps", "0.12", "--attacks", "pgd", "--spsa-samples",
           "8", "--pgd-steps", "3", "--search", "--max-squeezers", "2", "--json", cwd=tmp_path, timeout=300)
    assert r.code == 0, r.err
    report = json.loads(r.out)
    sq = report["squeezers"]
    assert "bits" not in sq and 1 <= len(sq["squeezers"]) <= 2
    assert all(item["scale"] > 0 and set(item) - {"scale"} <= {"bits", "median"} for item in sq["squeezers"])
    assert sq["search"]["tried"] == 7 + 21  # bits 1-5 and medians 2, 3: singles and pairs
    assert 0.0 <= sq["search"]["calibration_detection"] <= 1.0
    assert report["threshold"] > 0 and 0.0 <= report["clean_fpr"] <= 1.0
    one_line_error(eg("robustness", "digits", "--search", "--max-squeezers", "5", cwd=tmp_path), 2,
                   "--max-squeezers")


def test_pack_adversarial_squeezers_declares_the_set_with_its_scales(tmp_path: Path) -> None:
    case = digits_case()
    generate_keypair("publisher", tmp_path / "keys")
    generate_keypair("device", tmp_path / "keys")
    (tmp_path / "digits.onnx").write_bytes(case.model)
    meta = {k: v for k, v in case.meta().items() if k != "defence"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "clean.npz", x=case.calibration.x)
    np.savez(tmp_path / "golden.npz", **{"0/in/x": case.test.x[:1]})
    common = ["pack", "digits.onnx", "--name", "digits", "--version", "1",
              "--sign-key", "keys/publisher.key", "--recipient", "keys/device.pub",
              "--meta", "meta.json", "--golden", "golden.npz", "--adversarial", "flag",
              "--adversarial-data", "clean.npz", "--adversarial-fpr", "0.04"]
    r = eg(*common, "--adversarial-squeezers", "bits4,bits5", "-o", "d.egm", cwd=tmp_path)
    assert r.code == 0, r.err
    decl = json.loads(eg("inspect", "d.egm", cwd=tmp_path).out)["manifest"]["defence"]["adversarial"]
    assert [(next(k for k in s if k != "scale"), s.get("bits")) for s in decl["squeezers"]] == \
        [("bits", 4), ("bits", 5)]
    assert all(s["scale"] > 0 for s in decl["squeezers"]) and "bits" not in decl
    assert decl["calibrated_on"] == len(case.calibration.y) and decl["threshold"] > 0
    for bad in ("bits4,blur3", "bits4,bits5,bits3,bits2,bits1", "bits4,bits4"):
        one_line_error(eg(*common, "--adversarial-squeezers", bad, "-o", "e.egm", cwd=tmp_path), 2)
        assert not (tmp_path / "e.egm").exists()
