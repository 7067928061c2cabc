"""The loss is loomlens's own: decoder inputs from labels, padding ignored, checked by hand."""

import math

import torch

from loomlens.train.loss import LossSpec, batch_loss, decoder_inputs, token_cross_entropy


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
    loss_sum, count = batch_loss(model, batch, LossSpec(decoder_start_token_id=2, pad_token_id=1))

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


def test_soft_location_labels_match_a_hand_computation():
    """Text tokens keep the exact target; a location token's target is a Gaussian over bins."""
    loc_start, sigma = 5, 3.0
    logits = torch.randn(1, 3, loc_start + 1000, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[4, loc_start + 500, -100]])
    loss_sum, count = token_cross_entropy(logits, labels, loc_start, sigma)

    logp = torch.log_softmax(logits.double(), dim=-1)[0]
    weights = [math.exp(-((b - 500) ** 2) / (2 * sigma**2)) for b in range(1000)]
    total = sum(weights)
    by_hand = -logp[0, 4].item() - sum(w / total * logp[1, loc_start + b].item() for b, w in enumerate(weights))
    assert count.item() == 2
    assert math.isclose(loss_sum.item(), by_hand, rel_tol=1e-5)
    exact, _ = token_cross_entropy(logits, labels)
    assert not math.isclose(loss_sum.item(), exact.item(), rel_tol=1e-3)


def test_pointer_term_adds_weight_times_pointer_loss_per_token(small_model_dir):
    from PIL import Image

    from loomlens.model import load_model
    from loomlens.train.spatial_loss import pointer_loss, pointer_mask

    model, processor = load_model(str(small_model_dir))
    model.set_attn_implementation("eager")
    loc = processor.tokenizer.convert_tokens_to_ids("<loc_0>")
    inputs = processor(text=["<OD>"], images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    labels = torch.tensor([[0, 40, loc + 100, loc + 200, loc + 600, loc + 900, 2]])
    batch = {**inputs, "labels": labels}
    plain, count = batch_loss(model, batch, LossSpec(2, 1, loc))
    with_pointer, _ = batch_loss(model, batch, LossSpec(2, 1, loc, pointer_weight=0.5, grid=4))
    out = model(**inputs, decoder_input_ids=decoder_inputs(labels, 2, 1), output_attentions=True)
    cross = out.cross_attentions[-1]
    pointer = pointer_loss(cross, pointer_mask(labels, loc, 4, cross.shape[-1]))
    assert pointer.item() > 0
    assert math.isclose(with_pointer.item(), plain.item() + 0.5 * pointer.item() * count.item(), rel_tol=1e-4)
