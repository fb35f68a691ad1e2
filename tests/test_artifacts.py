"""The one artifact contract: what `write_artifact` saves, `read_artifact` gives back exactly, and every way a folder
can be wrong is one ArtifactError naming the folder and the field; the CE bank and weight deltas use it too."""
import json
import struct
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from gavel.artifacts import (
    FORMAT_VERSION,
    MANIFEST,
    TENSORS,
    Manifest,
    ModelFingerprint,
    read_artifact,
    tensor_sha256,
    write_artifact,
)
from gavel.errors import ArtifactError

FP = ModelFingerprint(name="tiny", architecture="LlamaForCausalLM", d_model=8, n_layers=2, weights_sha256="a" * 64)
OTHER = FP.model_copy(update={"name": "other", "weights_sha256": "b" * 64})


class ThingManifest(Manifest):
    kind: Literal["thing"] = "thing"
    size: int


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "head0/b": torch.arange(5), "empty": torch.zeros(0, 2)}


def saved(tmp_path, fingerprint=FP):
    return write_artifact(tmp_path / "thing", ThingManifest(size=3, fingerprint=fingerprint,
                                                            provenance={"data": "planted"}), tensors())


def flip_tensor_bytes(folder):
    """Change bytes of the tensor data (after the safetensors header), not the header."""
    path = folder / TENSORS
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    for i in range(start, start + 4):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_round_trip_gives_back_the_manifest_and_tensors(tmp_path):
    folder = saved(tmp_path)
    manifest, got = read_artifact(folder, ThingManifest, fingerprint=FP)
    assert (manifest.kind, manifest.size, manifest.format_version) == ("thing", 3, FORMAT_VERSION)
    assert manifest.fingerprint == FP and manifest.provenance == {"data": "planted"}
    assert set(got) == set(tensors()) and all(torch.equal(got[k], v) for k, v in tensors().items())
    assert manifest.tensors == {k: tensor_sha256(v) for k, v in tensors().items()}
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, TENSORS]


def test_a_digest_is_of_dtype_shape_and_bytes():
    a = torch.arange(6, dtype=torch.float32)
    assert tensor_sha256(a) == tensor_sha256(a.clone()) != tensor_sha256(a.reshape(2, 3))
    assert tensor_sha256(a) != tensor_sha256(a.double()) and tensor_sha256(a) != tensor_sha256(a + 1e-6)


def test_changed_or_damaged_tensors_are_refused(tmp_path):
    folder = saved(tmp_path)
    flip_tensor_bytes(folder)
    with pytest.raises(ArtifactError, match=r"tensor '.*' does not match its sha256"):
        read_artifact(folder, ThingManifest)
    folder = saved(tmp_path)
    (folder / TENSORS).write_bytes((folder / TENSORS).read_bytes()[:40])
    with pytest.raises(ArtifactError, match="unreadable tensors"):
        read_artifact(folder, ThingManifest)
    folder = saved(tmp_path)
    (folder / TENSORS).unlink()
    with pytest.raises(ArtifactError, match="is not a whole thing"):
        read_artifact(folder, ThingManifest)
    folder = saved(tmp_path)
    write_artifact(tmp_path / "fewer", ThingManifest(size=3), {"w": tensors()["w"]})
    (folder / TENSORS).write_bytes((tmp_path / "fewer" / TENSORS).read_bytes())
    with pytest.raises(ArtifactError, match=r"missing: \['empty', 'head0/b'\]"):
        read_artifact(folder, ThingManifest)


def test_a_bad_manifest_names_the_folder_and_field(tmp_path):
    with pytest.raises(ArtifactError, match=r"is not a thing \(no manifest.json\)") as err:
        read_artifact(tmp_path, ThingManifest, hint="make one with `gavel thing`")
    assert err.value.hint == "make one with `gavel thing`"
    folder = saved(tmp_path)
    raw = json.loads((folder / MANIFEST).read_text())
    cases = [("{not json", "unreadable manifest"), ("[1, 2]", "a manifest is a JSON object"),
             (json.dumps({**raw, "kind": "ce_bank"}), "holds a ce bank, not a thing"),
             (json.dumps({**raw, "kind": "input_perturbation"}), "holds an input perturbation, not a thing"),
             (json.dumps({**raw, "format_version": 1}), "format_version 1 is not supported"),
             (json.dumps({**raw, "size": "big"}), "field size: Input should be a valid integer"),
             (json.dumps({**raw, "sise": 3}), "field sise: Extra inputs are not permitted")]
    for text, message in cases:
        (folder / MANIFEST).write_text(text)
        with pytest.raises(ArtifactError, match=message):
            read_artifact(folder, ThingManifest)


def test_another_model_is_refused_unless_forced(tmp_path):
    folder = saved(tmp_path)
    with pytest.raises(ArtifactError, match="made for model 'tiny' but is being used with 'other': weights_sha256"):
        read_artifact(folder, ThingManifest, fingerprint=OTHER)
    assert read_artifact(folder, ThingManifest, fingerprint=OTHER, force=True)[0].fingerprint == FP
    unbound = saved(tmp_path, fingerprint=None)
    with pytest.raises(ArtifactError, match="records no model fingerprint"):
        read_artifact(unbound, ThingManifest, fingerprint=FP)
    assert read_artifact(unbound, ThingManifest)[0].fingerprint is None


def test_every_manifest_kind_declares_its_kind():
    """Each artifact kind is a Manifest subclass with its own literal kind and forbids unknown fields."""
    from gavel.base import EstimatorManifest
    from gavel.probes.bank import BankManifest
    from gavel.steering.delta import DeltaManifest

    for kind in (BankManifest, DeltaManifest, EstimatorManifest):
        assert issubclass(kind, Manifest) and issubclass(kind, BaseModel)
        assert kind.model_config["extra"] == "forbid"
    assert {BankManifest.model_fields["kind"].default, DeltaManifest.model_fields["kind"].default} == {
        "ce_bank", "weight_delta"}


def test_a_ce_bank_is_checked_like_every_artifact(organism, organism_bank, tmp_path):
    from gavel.probes.bank import CEBank

    folder = organism_bank.save(tmp_path / "bank")
    assert CEBank.load(folder, fingerprint=organism.fingerprint()).names == organism_bank.names
    flip_tensor_bytes(folder)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        CEBank.load(folder, fingerprint=organism.fingerprint())


def test_a_weight_delta_is_checked_like_every_artifact(organism, tmp_path):
    from gavel.steering.delta import WeightDelta

    name = "model.layers.0.mlp.down_proj.weight"
    weight = dict(organism.hf_model.named_parameters())[name]
    delta = WeightDelta.for_model(organism.hf_model, organism.fingerprint(), {name: torch.ones_like(weight)})
    folder = delta.save(tmp_path / "delta")
    assert WeightDelta.load(folder, organism.fingerprint()).base_sha256 == {name: tensor_sha256(weight)}
    flip_tensor_bytes(folder)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        WeightDelta.load(folder)
