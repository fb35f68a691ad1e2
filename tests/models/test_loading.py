"""load_model: the built-in organism, local directories of tiny models, errors, the lens backend."""
import pytest
import torch

from gavel.errors import ModelLoadError
from gavel.models.loading import load_model, resolve_spec


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_model):
    from gavel.organism import corpus
    from gavel.organism.tokenizer import build_tokenizer

    tok = build_tokenizer(corpus.vocabulary())
    return tiny_model("llama", vocab=len(tok), positions=None, tokenizer=tok, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      save_to=tmp_path_factory.mktemp("tiny_llama"))


def test_builtin_organism(organism):
    assert organism.family == "llama" and organism.n_layers == 4 and organism.d_model == 128
    assert organism.tokenizer.chat_template
    fp = organism.fingerprint()
    assert fp.architecture == "LlamaForCausalLM" and len(fp.weights_sha256) == 64


def test_local_directory(tiny_llama_dir):
    handle = load_model(tiny_llama_dir)
    assert handle.n_layers == 2 and handle.d_model == 32 and handle.backend == "hf"
    assert handle.fingerprint() != load_model("builtin:organism").fingerprint()


def test_spec_resolution_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="built-in"):
        resolve_spec("builtin:nonesuch")
    with pytest.raises(ModelLoadError, match=r"config.json"):
        resolve_spec(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_spec("./no/such/dir")
    assert resolve_spec("org/model-name") == ("org/model-name", False)  # a hub id, passed on as is


def test_unknown_backend(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="backend"):
        load_model(tiny_llama_dir, backend="onnx")


def test_lens_backend_sees_the_same_activations(organism):
    from gavel.models.chat import encode_conversation
    from gavel.models.collect import collect_activations

    lens = load_model("builtin:organism", backend="lens")
    enc = [encode_conversation(organism.tokenizer, [{"role": "user", "content": "how do i fix my bike ?"}])]
    site = "blocks.2.hook_resid_post"
    a = collect_activations(organism, enc, [site]).sites[site]
    b = collect_activations(lens, enc, [site]).sites[site]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
