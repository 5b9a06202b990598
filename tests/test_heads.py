"""Segmentation heads: output shapes, and gradients that reach the head but never the encoder."""

from __future__ import annotations

import pytest
import torch

from hsissl.losses.focal import FocalLoss
from hsissl.models import create_model
from hsissl.models.heads import HEADS, ConvDecoderHead, SegmenterHead, create_head
from hsissl.segment.finetune import FrozenEncoder, SegmentationModel

DIM, BLOCKS = 64, 4


def maps(batch: int = 2, dim: int = DIM, grid: int = 8, n: int = BLOCKS) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, dim, grid, grid) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_give_logits_at_input_size(name):
    head = create_head(name, embed_dim=DIM, n_blocks=BLOCKS, patch_size=8)
    assert head(maps()).shape == (2, 25, 64, 64)
    small = create_head(name, embed_dim=DIM, n_blocks=BLOCKS, num_classes=7, patch_size=8)
    assert small(maps(grid=4)).shape == (2, 7, 32, 32)  # 32x32 crops: a 4x4 grid


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_refuse_the_wrong_number_of_maps(name):
    head = create_head(name, embed_dim=DIM, n_blocks=BLOCKS)
    with pytest.raises(ValueError, match="expects the patch maps of 4 blocks, got 3"):
        head(maps(n=3))
    with pytest.raises(ValueError, match=r"expected \(B, 64, h, w\)"):
        head(maps(dim=32))


def test_unknown_head_names_the_known_ones():
    with pytest.raises(KeyError, match="conv.*linear.*segmenter"):
        create_head("fpn", embed_dim=DIM)


def test_conv_head_uses_one_skip_per_stage_and_refuses_more_blocks():
    head = ConvDecoderHead(DIM, n_blocks=4, patch_size=8)
    assert len(head.skips) == 3 and len(head.up) == 3  # 8 -> 16 -> 32 -> 64
    assert len(ConvDecoderHead(DIM, n_blocks=2, patch_size=8).skips) == 1
    with pytest.raises(ValueError, match="uses 1..4 blocks"):
        ConvDecoderHead(DIM, n_blocks=5, patch_size=8)


def test_segmenter_rounds_its_width_up_to_a_multiple_of_the_heads():
    assert SegmenterHead(64, num_heads=12).dim == 72  # the paper's 12 heads on a tiny encoder
    assert SegmenterHead(768, num_heads=12).dim == 768
    assert len(SegmenterHead(64, depth=2, num_heads=4).blocks) == 2
    with pytest.raises(ValueError, match="not divisible"):
        SegmenterHead(64, num_heads=12, dim=64)


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("factory", ["vit_tiny_patch8_64", "ssvit_tiny_patch8_64"])
def test_gradients_flow_only_into_the_head(name, factory):
    torch.manual_seed(0)
    encoder = create_model(factory)
    extra = {"num_heads": 4} if name == "segmenter" else {}
    model = SegmentationModel(encoder, create_head(name, DIM, BLOCKS, **extra), BLOCKS)
    model.train()
    assert not any(m.training for m in model.encoder.modules()), "encoder left eval mode"
    assert all(m.training for m in model.head.modules())
    x = torch.randn(2, 32, 64, 64)
    labels = torch.randint(0, 25, (2, 64, 64))
    FocalLoss(gamma=0.0)(model(x), labels).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_frozen_encoder_gives_the_encoders_own_maps():
    torch.manual_seed(0)
    encoder = create_model("dinov2_vit_tiny_patch8_64")
    x = torch.randn(2, 32, 64, 64)
    expected = encoder.eval().get_intermediate_layers(x, n=2)
    got = FrozenEncoder(encoder, n_blocks=2)(x)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not got[0].requires_grad
