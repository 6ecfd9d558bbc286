"""The three SSD paths agree: chunked == sequential recurrence == token-by-token decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import rel_error
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_moe.ops.ssd import segsum, ssd_chunked, ssd_sequential, ssd_step

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def random_inputs(b=2, l=37, h=4, p=8, g=2, n=16, dtype=torch.float64, state=False):
    x = torch.randn(b, l, h, p, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, h, dtype=dtype) - 2)           # roughly [0.01, 1]
    A = -torch.empty(h, dtype=dtype).uniform_(0.5, 8)
    B = torch.randn(b, l, g, n, dtype=dtype)
    C = torch.randn(b, l, g, n, dtype=dtype)
    D = torch.randn(h, dtype=dtype)
    init = torch.randn(b, h, p, n, dtype=dtype) if state else None
    return x, dt, A, B, C, D, init


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_sequential(dtype, groups, with_state):
    x, dt, A, B, C, D, init = random_inputs(g=groups, dtype=dtype, state=with_state)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D, init)
    y, s = ssd_chunked(x, dt, A, B, C, 8, D, init)
    assert rel_error(y, y_ref) < TOL[dtype]
    assert rel_error(s, s_ref) < TOL[dtype]


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_result_independent_of_chunk_size(chunk):
    x, dt, A, B, C, D, init = random_inputs(l=45, state=True)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 45, D, init)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D, init)
    assert rel_error(y, y_ref) < 1e-10 and rel_error(s, s_ref) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_by_step_decode_equals_chunked(dtype):
    x, dt, A, B, C, D, init = random_inputs(l=20, dtype=dtype, state=True)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 8, D, init)
    state = init.clone()
    for t in range(x.shape[1]):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert rel_error(y_t, y_ref[:, t]) < TOL[dtype] * 10
    assert rel_error(state, s_ref) < TOL[dtype]


def test_prefill_in_pieces_equals_one_pass():
    x, dt, A, B, C, D, _ = random_inputs(l=50)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 16, D)
    state, ys = None, []
    for a, b in [(0, 7), (7, 8), (8, 33), (33, 50)]:
        y, state = ssd_chunked(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], 16, D, state)
        ys.append(y)
    assert rel_error(torch.cat(ys, 1), y_ref) < 1e-10
    assert rel_error(state, s_ref) < 1e-10


def test_padding_with_zero_dt_leaves_state_and_outputs_unchanged():
    x, dt, A, B, C, D, init = random_inputs(l=21, state=True)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 8, D, init)
    pad_l, pad_r = 5, 6

    def padded(t, fill_random=True):
        shape = list(t.shape)
        left, right = shape.copy(), shape.copy()
        left[1], right[1] = pad_l, pad_r
        make = torch.randn if fill_random else torch.zeros
        return torch.cat([make(left, dtype=t.dtype), t, make(right, dtype=t.dtype)], dim=1)

    # Garbage inputs at padded positions, but dt = 0 there.
    y, s = ssd_chunked(padded(x), padded(dt, fill_random=False), A, padded(B), padded(C), 8, D, init)
    assert rel_error(y[:, pad_l:pad_l + x.shape[1]], y_ref) < 1e-10
    assert rel_error(s, s_ref) < 1e-10


def test_segsum_matches_definition():
    a = torch.randn(3, 9, dtype=torch.float64)
    out = segsum(a)
    for i in range(9):
        for j in range(9):
            expected = a[:, j + 1:i + 1].sum(-1) if i >= j else torch.full((3,), float("-inf"), dtype=a.dtype)
            assert torch.allclose(out[:, i, j], expected)


def test_bad_shapes_are_named():
    x, dt, A, B, C, D, _ = random_inputs()
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(x, dt[:, :-1], A, B, C, 8, D)
    with pytest.raises(ValueError, match="B"):
        ssd_chunked(x, dt, A, B[:, :, :, None], C, 8, D)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, 8, D, torch.zeros(1, 2, 3, 4, dtype=x.dtype))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 40), groups=st.sampled_from([1, 2]), heads_per_group=st.integers(1, 3),
       p=st.integers(1, 5), n=st.integers(1, 6), chunk=st.integers(1, 17), with_state=st.booleans())
def test_chunked_equals_sequential_for_any_shape(b, l, groups, heads_per_group, p, n, chunk, with_state):
    x, dt, A, B, C, D, init = random_inputs(b=b, l=l, h=groups * heads_per_group, p=p, g=groups, n=n,
                                            state=with_state)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D, init)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D, init)
    assert y.shape == (b, l, groups * heads_per_group, p) and s.shape == (b, groups * heads_per_group, p, n)
    assert rel_error(y, y_ref) < 1e-10 and rel_error(s, s_ref) < 1e-10
