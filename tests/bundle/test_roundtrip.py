"""Round trips on real models: pack then open gives back the exact model; runtimes load it from memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeguard.bundle import RollbackFloor, inspect_bundle, open_bundle, pack_bundle, verify_bundle
from edgeguard.engine._litert import litert_module
from edgeguard.errors import BundleRejected
from edgeguard.keys import TrustStore, load_trusted_key
from tests.bundle.conftest import Party, make_party


def test_yolov8n_one_recipient_from_path_and_bytes(party: Party, yolov8n_path: Path, tmp_path: Path) -> None:
    model = yolov8n_path.read_bytes()
    rng = np.random.default_rng(1)
    image = rng.random((1, 3, 320, 320), dtype=np.float32)
    bundle = pack_bundle(
        model,
        name="yolov8n",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient],
        golden=[{"in": {"images": image}, "out": {}}],
    )
    path = tmp_path / "y.egm"
    path.write_bytes(bundle)
    for source in (path, bundle):
        opened = open_bundle(source, trust=party.trust, device_key=party.device, state_dir=None)
        assert opened.model == model
        m = opened.manifest
        assert (m.format, m.name, m.version, m.payload_size) == ("onnx", "yolov8n", 1, len(model))
        assert m.payload_sha256 == hashlib.sha256(model).hexdigest()
        assert [t.name for t in m.inputs] == ["images"] and m.inputs[0].shape[1] == 3
        assert m.publisher_key_id == party.publisher.key_id
        assert m.recipient_key_ids == (party.device.key_id,)
        # The golden outputs were computed by the packer's reference run; the opened model reproduces them.
        (sample,) = opened.golden
        np.testing.assert_array_equal(sample.inputs["images"], image)
        session = ort.InferenceSession(bytes(opened.model), providers=["CPUExecutionProvider"])
        (out,) = session.run(["output0"], {"images": image})
        np.testing.assert_allclose(out, sample.outputs["output0"], rtol=1e-4, atol=1e-4)
        opened.wipe()
        assert opened.model == bytearray(len(model))


def test_several_recipients_each_open_others_refused(
    party: Party, ppocr_det_path: Path, tmp_path: Path
) -> None:
    devices = [make_party(tmp_path / f"d{i}") for i in range(3)]
    outsider = make_party(tmp_path / "outsider")
    model = ppocr_det_path.read_bytes()
    bundle = pack_bundle(
        model, name="ocr", version=7, sign_key=party.publisher, recipients=[d.recipient for d in devices]
    )
    for d in devices:
        assert open_bundle(bundle, trust=party.trust, device_key=d.device, state_dir=None).model == model
    with pytest.raises(BundleRejected) as exc:
        open_bundle(bundle, trust=party.trust, device_key=outsider.device, state_dir=None)
    assert exc.value.check == "not a recipient"


def test_tflite_blazeface_with_golden_computed_by_litert(party: Party, blazeface_path: Path) -> None:
    Interpreter = litert_module()[0].Interpreter  # ai_edge_litert, or tflite_runtime in its leg

    model = blazeface_path.read_bytes()
    image = np.random.default_rng(2).random((1, 128, 128, 3), dtype=np.float32)
    bundle = pack_bundle(
        model,
        name="blazeface",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient],
        golden=[{"in": {"input": image}, "out": {}}],
        chunk_size=64 * 1024,
    )
    opened = open_bundle(bundle, trust=party.trust, device_key=party.device, state_dir=None)
    assert opened.manifest.format == "tflite" and opened.model == model
    assert {t.name for t in opened.manifest.inputs} == {"input"}
    assert opened.manifest.inputs[0].shape == (1, 128, 128, 3)
    (sample,) = opened.golden
    assert set(sample.outputs) == {t.name for t in opened.manifest.outputs}
    interp = Interpreter(model_content=bytes(opened.model))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], image)
    interp.invoke()
    for d in interp.get_output_details():
        np.testing.assert_allclose(
            interp.get_tensor(d["index"]), sample.outputs[d["name"]], rtol=1e-5, atol=1e-5
        )


def test_golden_npz_with_outputs_kept_and_arrays_read_only(party: Party, tiny_model: bytes) -> None:
    x = np.arange(96, dtype=np.float32).reshape(1, 96)
    y = np.full((1, 96), 7, np.float32)  # deliberately not the model's output: given outputs are kept
    bundle = pack_bundle(
        tiny_model,
        name="tiny",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient],
        golden=[{"in": {"x": x}, "out": {"y": y}}, {"in": {"x": x + 1}, "out": {}}],
        chunk_size=4096,
    )
    opened = open_bundle(bundle, trust=party.trust, device_key=party.device, state_dir=None)
    assert opened.manifest.golden_count == 2
    np.testing.assert_array_equal(opened.golden[0].outputs["y"], y)
    assert not np.array_equal(opened.golden[1].outputs["y"], y)
    with pytest.raises(ValueError):
        opened.golden[0].inputs["x"][0, 0] = 1


def test_rotation_two_trusted_keys(party: Party, other: Party, tiny_model: bytes, tmp_path: Path) -> None:
    trust = TrustStore.from_files([party.dir / "publisher.pub", other.dir / "publisher.pub"])
    for signer in (party, other):
        b = pack_bundle(
            tiny_model, name="t", version=1, sign_key=signer.publisher, recipients=[party.recipient]
        )
        assert open_bundle(b, trust=trust, device_key=party.device, state_dir=None).model == tiny_model
    assert set(trust.key_ids) == {party.publisher.key_id, other.publisher.key_id}
    assert load_trusted_key(party.dir / "publisher.pub")


def test_floor_raised_only_after_full_verification(party: Party, tiny_model: bytes, tmp_path: Path) -> None:
    state = tmp_path / "state"
    floor = RollbackFloor(state)
    b5 = pack_bundle(tiny_model, name="t", version=5, sign_key=party.publisher, recipients=[party.recipient])
    verify_bundle(b5, trust=party.trust, state_dir=state)  # verify never writes
    assert floor.get("t") == 0
    broken = bytearray(b5)
    broken[-1] ^= 1
    with pytest.raises(BundleRejected):
        open_bundle(bytes(broken), trust=party.trust, device_key=party.device, state_dir=state)
    assert floor.get("t") == 0
    opened = open_bundle(b5, trust=party.trust, device_key=party.device, state_dir=state, commit_floor=False)
    assert floor.get("t") == 0
    assert opened.commit_rollback_floor() and floor.get("t") == 5
    assert not opened.commit_rollback_floor()  # idempotent
    # The same version re-opens (a restart), a lower one is refused.
    open_bundle(b5, trust=party.trust, device_key=party.device, state_dir=state)
    b4 = pack_bundle(tiny_model, name="t", version=4, sign_key=party.publisher, recipients=[party.recipient])
    with pytest.raises(BundleRejected) as exc:
        open_bundle(b4, trust=party.trust, device_key=party.device, state_dir=state)
    assert exc.value.check == "rollback"
    # Another name is refused while the slot is pinned to the name served; model.name re-pins it. Floors
    # are per model name.
    b1 = pack_bundle(
        tiny_model, name="other", version=1, sign_key=party.publisher, recipients=[party.recipient]
    )
    with pytest.raises(BundleRejected) as exc:
        open_bundle(b1, trust=party.trust, device_key=party.device, state_dir=state)
    assert exc.value.check == "wrong model"
    open_bundle(b1, trust=party.trust, device_key=party.device, state_dir=state, model_name="other")
    assert (floor.get("t"), floor.get("other"), floor.slot()) == (5, 1, "other")


def test_inspect_shows_manifest_without_secrets(party: Party, tiny_bundle: bytes, tiny_model: bytes) -> None:
    info = inspect_bundle(tiny_bundle)
    assert info["signature_checked"] is False
    text = repr(info)
    assert "tiny" in text and party.device.key_id in text
    opened = open_bundle(tiny_bundle, trust=party.trust, device_key=party.device, state_dir=None)
    assert opened.manifest.to_json() == info["manifest"]


def test_meta_overrides_and_is_validated(party: Party, tiny_model: bytes, tmp_path: Path) -> None:
    from edgeguard.bundle import load_meta
    from edgeguard.errors import ConfigError

    meta_file = tmp_path / "meta.json"
    meta_file.write_text(
        '{"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 96], "range": [-1, 1]}],'
        ' "preprocess": {"layout": "NC"}, "tolerance": {"rtol": 0.01, "atol": 0.001},'
        ' "description": "tiny test model"}'
    )
    bundle = pack_bundle(
        tiny_model,
        name="tiny",
        version=1,
        sign_key=party.publisher,
        recipients=[party.recipient],
        meta=load_meta(meta_file),
    )
    m = open_bundle(bundle, trust=party.trust, device_key=party.device, state_dir=None).manifest
    assert m.inputs[0].value_range == (-1.0, 1.0)
    assert [t.name for t in m.outputs] == ["y"]  # not in meta: read from the model
    assert m.preprocess == {"layout": "NC"} and m.golden_tolerance.rtol == 0.01
    assert m.description == "tiny test model"
    meta_file.write_text('{"inputs": [], "colour": "blue"}')
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_meta(meta_file)
    with pytest.raises(ConfigError, match="golden sample 0"):
        pack_bundle(
            tiny_model,
            name="tiny",
            version=1,
            sign_key=party.publisher,
            recipients=[party.recipient],
            golden=[{"in": {"wrong": np.zeros((1, 96), np.float32)}, "out": {"y": np.zeros((1, 96))}}],
        )
