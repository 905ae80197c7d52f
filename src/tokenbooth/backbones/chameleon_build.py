"""Builders of new Chameleon-architecture models (mini, the tests' tiny models): the vocabulary in Chameleon's
order, a byte-level BPE text tokenizer over it, and a transformers `ChameleonConfig`. The token layout they
spell is `chameleon.py`'s."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .chameleon import IMAGE_END, IMAGE_START, ROW_END, TURN_END, image_token_name, size_token

NUM_PLACEHOLDER_TOKENS = 32  # <reserved00000>.. : free rows for personalization's [V], as in Chameleon
BPE_MERGES = 600


def vocabulary_specials(n_codes: int) -> list[str]:
    """Special tokens in Chameleon's order: control tokens, then the image tokens, then the structure
    tokens of Lumina-mGPT's image block, size tokens, and reserved rows."""
    return (
        ["<s>", "<pad>", "</s>", "<unk>"]
        + [image_token_name(c) for c in range(n_codes)]
        + [IMAGE_END, IMAGE_START, TURN_END, ROW_END]
        + [size_token(n) for n in range(1, 17)]
        + [f"<reserved{n:05d}>" for n in range(NUM_PLACEHOLDER_TOKENS)]
    )


def train_bpe_tokenizer(texts: list[str], n_codes: int, merges: int):
    specials = vocabulary_specials(n_codes)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()  # "A Red Robot" means the same as "a red robot"
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # any character has a token
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 256 + merges, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def chameleon_config(vocabulary: dict, n_codes: int, hidden: int = 256, layers: int = 6,
                     heads: int = 8, context: int = 256,
                     resolution: int = 32):
    """A Chameleon config over `vocabulary`: Lumina-mGPT 7B's architecture (4096 wide, 32 layers, 32 heads) cut
    down; mini and the tests' tiny models are built with it."""
    from transformers import ChameleonConfig  # here for start-up time, as chameleon.py's model class

    vocab_size = -(-len(vocabulary) // 64) * 64
    return ChameleonConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
        bos_token_id=vocabulary["<s>"], pad_token_id=vocabulary["<pad>"], eos_token_id=vocabulary[TURN_END],
        vocabulary_map=vocabulary,
        # transformers builds Chameleon's encoder-only VQVAE inside the model; tokenbooth's VQGAN is the
        # image tokenizer, so that slot is kept as small as the class allows.
        vq_config=dict(embed_dim=4, num_embeddings=n_codes, latent_channels=32, base_channels=32,
                       channel_multiplier=[1], num_res_blocks=0, resolution=resolution),
    )
