"""Chat encoding: template rendering, per-token role masks, the fallback layout, bad conversations."""
import pytest

from gavel.errors import DataError
from gavel.io.conversations import ROLE_ASSISTANT, ROLE_NONE, ROLE_SYSTEM, ROLE_USER
from gavel.models.chat import FALLBACK_TEMPLATE, encode_conversation, render
from gavel.organism import corpus
from gavel.organism.tokenizer import build_tokenizer

CONV = [{"role": "system", "content": "answer the user briefly ."},
        {"role": "user", "content": "how do i fix my bike ?"},
        {"role": "assistant", "content": "sure . to fix your bike , first check the bike , then repair it carefully ."}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus.vocabulary())


def _tokens_with_role(tok, enc, role):
    return tok.convert_ids_to_tokens(enc.input_ids[enc.roles == role].tolist())


def test_roles_follow_message_contents(tokenizer):
    enc = encode_conversation(tokenizer, CONV)
    assert _tokens_with_role(tokenizer, enc, ROLE_SYSTEM) == CONV[0]["content"].split()
    assert _tokens_with_role(tokenizer, enc, ROLE_USER) == CONV[1]["content"].split()
    assert _tokens_with_role(tokenizer, enc, ROLE_ASSISTANT) == CONV[2]["content"].split()
    scaffolding = set(_tokens_with_role(tokenizer, enc, ROLE_NONE))
    assert scaffolding == {"<bos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}


def test_generation_prompt_is_appended(tokenizer):
    enc = encode_conversation(tokenizer, CONV[:2], add_generation_prompt=True)
    assert tokenizer.convert_ids_to_tokens(int(enc.input_ids[-1])) == "<|assistant|>"
    assert enc.roles[-1] == ROLE_NONE


def test_fallback_template_without_chat_template(tokenizer):
    plain = build_tokenizer(corpus.vocabulary())
    plain.chat_template = None
    text = render(plain, CONV[1:2], add_generation_prompt=True)
    assert text.startswith("User: how do i fix my bike ?")
    assert FALLBACK_TEMPLATE
    enc = encode_conversation(plain, CONV)
    assert plain.convert_ids_to_tokens(enc.input_ids[enc.roles == ROLE_USER].tolist()) == CONV[1]["content"].split()


@pytest.mark.parametrize("bad", ["just text", [{"role": "robot", "content": "x"}], [{"content": "x"}],
                                 [{"role": "user", "content": 3}]])
def test_bad_conversations_are_data_errors(tokenizer, bad):
    with pytest.raises(DataError):
        encode_conversation(tokenizer, bad)


def test_unicode_and_empty_content(tokenizer):
    enc = encode_conversation(tokenizer, [{"role": "user", "content": "héllo ☃"}, {"role": "assistant", "content": ""}])
    assert len(enc.input_ids) == len(enc.roles) == len(enc.offsets)
