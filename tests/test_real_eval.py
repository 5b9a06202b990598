"""Block splits and the real-data evaluation command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsissl.config import load_config
from hsissl.segment.blocks import block_split
from hsissl.stages.evaluate_real import dihedral, miou, summarise


def test_block_split_keeps_whole_blocks_on_one_side():
    mask = block_split((70, 70), block=8, train_fraction=0.1, seed=3)
    assert mask.shape == (70, 70)
    blocks = [mask[y : y + 8, x : x + 8] for y in range(0, 70, 8) for x in range(0, 70, 8)]
    assert all(b.all() or not b.any() for b in blocks)  # no block is split
    assert sum(b.all() for b in blocks) == round(0.1 * len(blocks))


def test_block_split_is_seeded():
    a, b = block_split((64, 64), 16, 0.5, 0), block_split((64, 64), 16, 0.5, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, block_split((64, 64), 16, 0.5, 1))
    with pytest.raises(ValueError, match="train_fraction"):
        block_split((64, 64), 16, 1.0, 0)


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = dihedral(x)
    assert views.shape == (8, 1, 3, 3)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_miou_counts_test_pixels_only():
    label = np.array([[1, 1], [2, 2]])
    pred = np.array([[1, 2], [2, 2]])
    test = np.array([[True, False], [True, True]])  # the wrong pixel is a training pixel
    assert miou(pred, label, test) == 1.0
    assert miou(pred, label, np.ones_like(test)) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_summary_table_has_mean_and_std_over_seeds():
    rows = [
        {"scene": "s", "protocol": "half", "seed": k, "miou": {"m": v}}
        for k, v in enumerate((0.5, 0.7))
    ]
    summary, table = summarise(rows)
    assert summary["s / half"]["m"]["mean"] == pytest.approx(0.6)
    assert "| m | 60.0 ± 10.0 |" in table


@pytest.mark.realdata
@pytest.mark.slow
def test_evaluate_real_runs_end_to_end(shared_data, tmp_path):
    from hsissl.stages import evaluate_real

    cfg = load_config(None, [f"run_dir={tmp_path}", f"real.source={shared_data}", "real.methods=[mae]",
                             "real.seeds=[0]", "real.pretrain_steps=5", "real.head_steps=5",
                             "real.scenes=[Indian_subset]", "mae.model=mae_vit_tiny_patch8_64",
                             "pretrain.batch_size=8", "tracking.uri="])  # fmt: skip
    result = evaluate_real.run(cfg)
    assert "pixel-lr" in result["table"] and "mae+linear" in result["table"]
