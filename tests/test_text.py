import pytest
import torch
from transformers import PreTrainedTokenizerFast

from streamdit.text import StreamDiTTextEncoder, build_tokenizer, tokenize, unknown_words

VOCABULARY = ["a", "Red", "circle", "square", "moves", "left", "red"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(VOCABULARY, max_length=8)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return StreamDiTTextEncoder(vocab_size=16, max_length=8, hidden_size=32, num_heads=4).eval()


def test_vocabulary_ids(tokenizer):
    tokens = ["[PAD]", "[UNK]", "[BOS]", "a", "red", "circle", "square", "moves", "left"]  # "Red" deduplicated
    assert tokenizer.get_vocab() == {token: i for i, token in enumerate(tokens)}


def test_bad_vocabulary_word_raises():
    with pytest.raises(ValueError, match="don't"):
        build_tokenizer(["don't"])


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    prompts = ["A red circle moves left", "a purple square!", ""]
    for expected, actual in zip(tokenize(tokenizer, prompts), tokenize(loaded, prompts)):
        assert torch.equal(expected, actual)
    assert loaded.model_max_length == 8


@pytest.mark.parametrize("variant", ["A RED circle.", "  a, red...circle ", "ａ ｒｅｄ ｃｉｒｃｌｅ"])
def test_case_punctuation_and_width_insensitive(tokenizer, variant):
    for expected, actual in zip(tokenize(tokenizer, ["a red circle"]), tokenize(tokenizer, [variant])):
        assert torch.equal(expected, actual)


def test_tokenize_pads_to_max_length_with_bos(tokenizer):
    input_ids, mask = tokenize(tokenizer, ["a red blob", ""])
    assert input_ids.dtype == torch.long and mask.dtype == torch.bool
    assert input_ids.tolist() == [[2, 3, 4, 1, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.sum(dim=1).tolist() == [4, 1]


def test_over_long_prompt_raises(tokenizer):
    fits = "a red circle moves left a red"  # 7 words + [BOS] = 8 tokens
    assert tokenize(tokenizer, [fits])[1].all()
    with pytest.raises(ValueError, match="'a red circle moves left a red square'"):
        tokenize(tokenizer, [fits, fits + " square"])


@pytest.mark.parametrize(
    "prompt, expected",
    [("A red, glowing circle!", ["glowing"]), ("Purple purple, PURPLE blob", ["purple", "blob"]), ("", [])],
)
def test_unknown_words(tokenizer, prompt, expected):
    assert unknown_words(tokenizer, prompt) == expected


def test_encoder_output_shape(encoder, tokenizer):
    with torch.no_grad():
        hidden = encoder(*tokenize(tokenizer, ["a red circle", ""]))
    assert hidden.shape == (2, 8, 32)
    assert torch.isfinite(hidden).all()


def test_padding_does_not_change_real_tokens(encoder, tokenizer):
    input_ids, mask = tokenize(tokenizer, ["a red circle"])
    other = input_ids.masked_fill(~mask, 7)  # a real word id at every padded position
    with torch.no_grad():
        short = encoder(input_ids[:, :4], mask[:, :4])
        hidden, changed = encoder(input_ids, mask), encoder(other, mask)
    torch.testing.assert_close(changed[mask], hidden[mask])
    torch.testing.assert_close(short[0], hidden[0, :4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "input_ids, mask, message",
    [
        (torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.bool), "L <= 8"),
        (torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), "attention_mask"),
        (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool), r"rows \[0\] have no real token"),
        (torch.zeros(3, 4, dtype=torch.long), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0] * 4]).bool(),
         r"rows \[1, 2\] have no real token"),
    ],
)
def test_encoder_bad_input_raises(encoder, input_ids, mask, message):
    with pytest.raises(ValueError, match=message):
        encoder(input_ids, mask)


@pytest.mark.parametrize(
    "prompts, message",
    [("a red circle", "got 'a red circle'"), (["a red circle", 3], r"got \['a red circle', 3\]")],
)
def test_tokenize_bad_prompts_raise(tokenizer, prompts, message):
    with pytest.raises(ValueError, match=message):
        tokenize(tokenizer, prompts)


def test_encoder_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        StreamDiTTextEncoder(vocab_size=16, hidden_size=30, num_heads=4)


def test_encoder_save_load_round_trip(encoder, tokenizer, tmp_path):
    encoder.save_pretrained(tmp_path)
    loaded = StreamDiTTextEncoder.from_pretrained(tmp_path).eval()
    inputs = tokenize(tokenizer, ["a red circle moves left", "square"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), encoder(*inputs), rtol=0, atol=0)


def test_pooled_text_is_the_mean_of_the_real_tokens_states():
    from streamdit.text import pooled

    embeds = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.stack([embeds[0, :2].mean(0), embeds[1].mean(0), embeds[2, 0]])
    torch.testing.assert_close(pooled(embeds, mask), expected)
    embeds[0, 3] = 1e6  # padding never counts
    torch.testing.assert_close(pooled(embeds, mask)[0], expected[0])
