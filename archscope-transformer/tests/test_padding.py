"""Right and left padding give the activations of the unpadded sequence at real tokens."""

from __future__ import annotations

import pytest
import torch
from transformer_reference import ids_for, model_of

from archscope import Backend

SITES = [
    "embed",
    *(f"layer_{i}.{r}" for i in range(3) for r in ("residual", "attn", "mlp", "mlp_hidden")),
    "final_norm",
    "logits",
]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_keeps_real_token_activations(family: str, side: str) -> None:
    backend = Backend.for_model(model_of(family))
    short, full = ids_for(5, batch=1, seq=5)[0], ids_for(6, batch=1, seq=8)[0]
    pad = torch.zeros(3, dtype=torch.long)
    if side == "right":
        row, mask_row = torch.cat([short, pad]), torch.tensor([1] * 5 + [0] * 3)
        real = slice(0, 5)
    else:
        row, mask_row = torch.cat([pad, short]), torch.tensor([0] * 3 + [1] * 5)
        real = slice(3, 8)
    batch = {
        "input_ids": torch.stack([row, full]),
        "attention_mask": torch.stack([mask_row, torch.ones(8, dtype=torch.long)]),
    }
    padded = backend.run(batch, capture=SITES)
    alone = backend.run(short[None], capture=SITES)
    longer = backend.run(full[None], capture=SITES)
    assert torch.equal(padded.attention_mask, batch["attention_mask"])
    for site in SITES:
        torch.testing.assert_close(
            padded[site][0, real], alone[site][0], atol=1e-5, rtol=0, msg=f"{side} padding, {site}"
        )
        torch.testing.assert_close(
            padded[site][1],
            longer[site][0],
            atol=1e-5,
            rtol=0,
            msg=f"unpadded row next to a padded one, {site}",
        )


def test_gpt2_needs_the_explicit_position_ids_under_left_padding() -> None:
    """Without the positions the backend passes, GPT-2 would shift its absolute positions."""
    model = model_of("gpt2")
    backend = Backend.for_model(model)
    ids = torch.tensor([[0, 0, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    with torch.no_grad():
        naive = model(input_ids=ids, attention_mask=mask).logits[0, 2:]
        alone = model(input_ids=ids[:, 2:]).logits[0]
    assert not torch.allclose(naive, alone, atol=1e-3)
    torch.testing.assert_close(
        backend.run({"input_ids": ids, "attention_mask": mask}, capture=["logits"]).logits[0, 2:],
        alone,
        atol=1e-5,
        rtol=0,
    )
