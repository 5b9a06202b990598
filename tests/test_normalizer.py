import numpy as np
import pytest
import torch

from hsissl.data.normalize import Normalizer, NormalizerMismatch


def make(bands=32, shift=0.0):
    return Normalizer(
        tuple(1000.0 + i + shift for i in range(bands)), tuple(100.0 + i for i in range(bands))
    )


def test_normalises_per_band_on_tensors_and_arrays():
    norm = make()
    x = (
        torch.full((2, 32, 4, 4), 1000, dtype=torch.int16)
        + torch.arange(32, dtype=torch.int16)[:, None, None]
    )
    out = norm(x)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.zeros_like(out))
    arr = norm(np.full((32, 2, 2), 1100, dtype=np.int16))
    np.testing.assert_allclose(arr[0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(arr[31], (1100 - 1031) / 131, rtol=1e-6)
    back = norm.denormalize(norm(x))
    assert torch.allclose(back, x.float(), atol=1e-3)


def test_refuses_other_band_counts():
    with pytest.raises(NormalizerMismatch, match=r"expects \(…, 32, H, W\)"):
        make()(torch.zeros(1, 3, 8, 8))


def test_fingerprint_is_stable_and_sensitive():
    assert make().fingerprint == make().fingerprint
    assert make().fingerprint != make(shift=1e-9).fingerprint
    assert make().fingerprint != make(bands=31).fingerprint


def test_check_refuses_foreign_statistics():
    ours, theirs = make(), make(shift=5)
    ours.check(ours.fingerprint, "dataset x")
    with pytest.raises(NormalizerMismatch, match="dataset x was normalised with statistics"):
        ours.check(theirs.fingerprint, "dataset x")


def test_dict_round_trip_and_tamper_detection():
    norm = make()
    assert Normalizer.from_dict(norm.to_dict()) == norm
    record = norm.to_dict()
    record["mean"][0] += 1
    with pytest.raises(NormalizerMismatch, match="edited or corrupted"):
        Normalizer.from_dict(record, origin="ckpt.pt")


def test_rejects_bad_std():
    with pytest.raises(ValueError, match="positive"):
        Normalizer((0.0, 0.0), (1.0, 0.0))
