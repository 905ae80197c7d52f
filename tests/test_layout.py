"""The token layout of the Chameleon family (Lumina-mGPT's, in miniature for the tiny model)."""

import torch

from tokenbooth.backbones.chameleon import (
    IMAGE_END, IMAGE_START, PROMPT_TEMPLATE, ROW_END, TURN_END, image_token_name, size_token,
)


def test_image_token_names_follow_chameleon_and_transformers_reads_them_back(tiny_backbone):
    assert image_token_name(123) == "IMGIMGBCDZ"
    mapping = tiny_backbone.model.model.vocabulary_mapping
    ids = tiny_backbone.layout.image_token_ids
    assert [mapping.bpe2img[int(i)] for i in ids] == list(range(len(ids)))


def test_size_tokens_count_lumina_grid_units():
    assert size_token(24) == "<reserved08824>"  # Lumina-mGPT 768 px: 768 / 32


def test_prompt_prefix_is_bos_text_separator_then_image_header(tiny_backbone):
    bb, tok = tiny_backbone, tiny_backbone.tokenizer
    ids = bb.prompt_ids("a red robot on the beach")
    assert ids[0] == tok.token_to_id("<s>")
    text = tok.decode(ids[1:-4])
    assert text == PROMPT_TEMPLATE.format(w=16, h=16, prompt="a red robot on the beach").lower()
    units = 16 // 4
    assert ids[-4:] == [tok.token_to_id(t) for t in (TURN_END, IMAGE_START, size_token(units), size_token(units))]


def test_unconditional_prefix_is_the_image_header_alone(tiny_backbone):
    assert tiny_backbone.unconditional_ids() == list(tiny_backbone.layout.header)


def test_body_puts_row_ends_after_every_row_and_the_image_end_last(tiny_backbone):
    layout, tok = tiny_backbone.layout, tiny_backbone.tokenizer
    codes = torch.randint(0, len(layout.image_token_ids), (2, layout.rows, layout.cols))
    body = layout.body_from_codes(codes)
    assert body.shape == (2, layout.rows * (layout.cols + 1) + 1)
    row_end, image_end = tok.token_to_id(ROW_END), tok.token_to_id(IMAGE_END)
    for j in range(body.shape[1]):
        expected = layout.forced_token(j)
        if j == body.shape[1] - 1:
            assert expected == image_end
        elif (j + 1) % (layout.cols + 1) == 0:
            assert expected == row_end
        else:
            assert expected is None
        if expected is not None:
            assert (body[:, j] == expected).all()
    assert torch.equal(layout.codes_from_body(body), codes)


def test_training_labels_hold_the_codes_at_image_positions_and_ignore_structure_tokens(tiny_backbone):
    layout = tiny_backbone.layout
    codes = torch.randint(0, layout.codebook_size, (2, layout.rows, layout.cols))
    labels, body = layout.body_labels(codes), layout.body_from_codes(codes)
    image = layout.image_positions()
    assert (labels[:, ~image] == -100).all()
    assert torch.equal(labels[:, image].reshape(codes.shape), codes)
    assert torch.equal(layout.token_ids(labels[:, image]), body[:, image])
