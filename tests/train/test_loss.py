"""The loss is loomlens's own: decoder inputs from labels, padding ignored, checked by hand."""

import math

import torch

from loomlens.train.loss import batch_loss, decoder_inputs, token_cross_entropy


def test_decoder_inputs_shift_right_with_start_token_and_pads():
    labels = torch.tensor([[0, 7, 8, 2, -100, -100], [0, 9, 2, -100, -100, -100]])
    expected = torch.tensor([[2, 0, 7, 8, 2, 1], [2, 0, 9, 2, 1, 1]])
    assert torch.equal(decoder_inputs(labels, decoder_start_token_id=2, pad_token_id=1), expected)


def test_cross_entropy_matches_a_hand_computation_and_ignores_padding():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.5, 0.5, 3.0], [9.0, -9.0, 9.0]]])
    labels = torch.tensor([[0, 2, -100]])
    loss_sum, count = token_cross_entropy(logits, labels)
    by_hand = -(2.0 - math.log(math.exp(2) + 1 + math.exp(1))) - (3.0 - math.log(2 * math.exp(0.5) + math.exp(3)))
    assert count.item() == 2
    assert math.isclose(loss_sum.item(), by_hand, rel_tol=1e-6)


def test_batch_loss_equals_cross_entropy_of_hand_built_decoder_inputs(small_model_dir):
    """The model gets decoder inputs we built (never `labels`), and padded rows cost nothing."""
    from loomlens.model import load_model

    model, processor = load_model(str(small_model_dir))
    from PIL import Image

    inputs = processor(text=["<OD>", "<OD>"], images=[Image.new("RGB", (64, 64))] * 2, return_tensors="pt")
    labels = torch.tensor([[0, 40, 50, 2], [0, 60, 2, -100]])
    batch = {**inputs, "labels": labels}
    loss_sum, count = batch_loss(model, batch, decoder_start_token_id=2, pad_token_id=1)

    total = 0.0
    for row, (dec, lab) in enumerate((([2, 0, 40, 50], [0, 40, 50, 2]), ([2, 0, 60], [0, 60, 2]))):
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"][row : row + 1],
                           pixel_values=inputs["pixel_values"][row : row + 1],
                           decoder_input_ids=torch.tensor([dec])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        total -= sum(logp[i, t].item() for i, t in enumerate(lab))
    assert count.item() == 7
    assert math.isclose(loss_sum.item(), total, rel_tol=1e-4)
