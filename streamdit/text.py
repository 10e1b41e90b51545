"""Word-level tokenizer and small bidirectional transformer text encoder for StreamDiT prompts.

Shape legend: B batch (prompts), L tokens (always the tokenizer's model_max_length), D hidden size.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import nn
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]")  # ids 0, 1, 2


def _normalizer() -> normalizers.Normalizer:
    # Punctuation becomes a word break, so "circle." and "circle" are the same word.
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\p{L}\p{N}\s]"), " ")]
    )


def build_tokenizer(vocabulary: list[str], max_length: int = 32) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: [PAD]=0, [UNK]=1, [BOS]=2, then ``vocabulary`` (lower-cased, deduplicated)."""
    normalizer = _normalizer()
    words = [normalizer.normalize_str(word) for word in vocabulary]
    for original, word in zip(vocabulary, words):
        if word.split() != [word]:  # could never be produced by the pre-tokenizer, so never matched
            raise ValueError(f"vocabulary word {original!r} does not normalise to a single word (got {word!r})")
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A leading [BOS] gives even an empty prompt one real token: attention over only padding would be NaN.
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        model_max_length=max_length,
        padding_side="right",
    )


def tokenize(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every prompt to ``model_max_length`` (so batches concatenate); never truncate."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r}")
    max_length = tokenizer.model_max_length
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length)
    for prompt, ids in zip(prompts, encoded["input_ids"]):
        if len(ids) > max_length:
            raise ValueError(f"prompt {prompt!r} needs {len(ids)} tokens (with [BOS]), more than {max_length}")
    input_ids = torch.tensor(encoded["input_ids"], dtype=torch.long).reshape(len(prompts), max_length)  # (B, L)
    attention_mask = torch.tensor(encoded["attention_mask"], dtype=torch.bool).reshape(len(prompts), max_length)
    return input_ids, attention_mask  # (B, L), (B, L)


def unknown_words(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[str]:
    """Words of ``prompt`` (as the tokenizer normalises and splits them) missing from the vocabulary."""
    backend = tokenizer.backend_tokenizer
    words = [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(prompt))]
    vocab = tokenizer.get_vocab()
    return list(dict.fromkeys(word for word in words if word not in vocab))


class StreamDiTTextEncoder(ModelMixin, ConfigMixin):
    """Token + learned position embeddings, pre-norm bidirectional transformer, final LayerNorm."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        max_length: int = 32,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_length, hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size,
            num_heads,
            dim_feedforward=int(hidden_size * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # No nested tensors: they would leave padded positions undefined and make outputs layout dependent.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        max_length = self.config.max_length
        if input_ids.ndim != 2 or input_ids.shape[1] > max_length:
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} must be (B, L) with L <= {max_length}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        attention_mask = attention_mask.bool()  # (B, L)
        empty = (~attention_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:  # a row of only padding would attend to nothing: NaN
            raise ValueError(f"attention_mask rows {empty} have no real token")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        x = self.encoder(x, src_key_padding_mask=~attention_mask)  # (B, L, D)
        return self.norm(x)  # (B, L, D)


def pooled(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) text states and their (B, L) mask -> (B, D): the mean over the real tokens, one vector a prompt (what a
    text-reading decoder is modulated by, `autoencoder.TextFiLM`)."""
    weights = mask.to(embeds.dtype)[:, :, None]  # (B, L, 1)
    return (embeds * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
