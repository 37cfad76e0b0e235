"""``load_state_dict_strict``: every key given and nothing extra, or one line naming the file and the part."""

from __future__ import annotations

import pytest
import torch

from fuse.errors import CheckpointError, FormatError
from fuse.state_dict import load_state_dict_strict


def test_exact_state_dict_loads():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert load_state_dict_strict(b, a.state_dict(), "x.safetensors", "projector weights") == []
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_missing_and_unexpected_keys_are_one_line():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(FormatError) as e:
        load_state_dict_strict(m, {"weight": torch.zeros(2, 3), "scale": torch.ones(1)}, "ckpt/model.safetensors",
                               "projector weights")
    assert str(e.value) == ("ckpt/model.safetensors: projector weights do not fit "
                            "(missing ['bias'], unexpected ['scale'])")
    with pytest.raises(CheckpointError):
        load_state_dict_strict(m, {}, "d", "weights", error=CheckpointError)


def test_may_miss_is_allowed_and_returned():
    m = torch.nn.Linear(3, 2)
    w = torch.randn(2, 3)
    assert load_state_dict_strict(m, {"weight": w}, "d", "weights", may_miss=lambda k: k == "bias") == ["bias"]
    assert torch.equal(m.weight, w)
