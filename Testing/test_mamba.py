"""Tests of the pure-PyTorch selective scan (S6) and the Mamba block (unifuse.model.mamba).

The parallel scan is checked against the sequential recurrence (the reference) for outputs, final states and
gradients of every input, in float64, over several lengths (powers of two and not), with and without an
initial state h0 and a per-token state injection.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unifuse.model.mamba import (
    SCAN_FLOPS_PER_ELEMENT,
    SCAN_INJECT_FLOPS_PER_ELEMENT,
    MambaBlock,
    count_scan_flops,
    linear_scan,
    selective_scan,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_inputs(batch, length, d_inner, n_state, *, h0=False, inject=False, skip=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    inputs = {
        "x": rnd(batch, length, d_inner),
        "delta": F.softplus(rnd(batch, length, d_inner)),
        "A": -torch.rand(d_inner, n_state, generator=gen, dtype=dtype) * 3 - 0.05,
        "B": rnd(batch, length, n_state),
        "C": rnd(batch, length, n_state),
        "D": rnd(d_inner) if skip else None,
        "h0": rnd(batch, d_inner, n_state) if h0 else None,
        "state_inject": rnd(batch, length, d_inner, n_state) if inject else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run(inputs, method):
    return selective_scan(
        inputs["x"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
        h0=inputs["h0"], state_inject=inputs["state_inject"], method=method, return_state=True,
    )


def reference_loop(a, b):
    h = torch.zeros_like(b[:, 0])
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 13, 31, 64])
def test_linear_scan_matches_loop(length):
    gen = torch.Generator().manual_seed(length)
    a = torch.rand(2, length, 3, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(2, length, 3, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(linear_scan(a, b), reference_loop(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 16, 33, 100])
@pytest.mark.parametrize("h0", [False, True])
@pytest.mark.parametrize("inject", [False, True])
def test_parallel_equals_sequential_outputs_states_and_gradients(length, h0, inject):
    inputs = make_inputs(2, length, 3, 4, h0=h0, inject=inject, seed=length)
    leaves = [v for v in inputs.values() if v is not None]
    weights_y = torch.randn(2, length, 3, dtype=torch.float64)
    weights_h = torch.randn(2, 3, 4, dtype=torch.float64)
    results = {}
    for method in ("parallel", "sequential"):
        y, last = run(inputs, method)
        loss = (y * weights_y).sum() + (last * weights_h).sum()
        results[method] = (y, last, torch.autograd.grad(loss, leaves))
    y_p, last_p, grads_p = results["parallel"]
    y_s, last_s, grads_s = results["sequential"]
    torch.testing.assert_close(y_p, y_s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last_p, last_s, rtol=1e-10, atol=1e-10)
    names = [k for k, v in inputs.items() if v is not None]
    for name, g_p, g_s in zip(names, grads_p, grads_s):
        torch.testing.assert_close(g_p, g_s, rtol=1e-9, atol=1e-9, msg=f"gradient of {name} differs")


def test_parallel_gradcheck():
    inputs = make_inputs(1, 6, 2, 3, h0=True, inject=True, seed=3)
    names = list(inputs)

    def fn(*tensors):
        y, last = selective_scan(*tensors[:6], h0=tensors[6], state_inject=tensors[7], return_state=True)
        return y, last

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names), eps=1e-6, atol=1e-6)


def test_without_skip_connection():
    inputs = make_inputs(2, 9, 3, 2, skip=False)
    y_p, _ = run(inputs, "parallel")
    y_s, _ = run(inputs, "sequential")
    torch.testing.assert_close(y_p, y_s)


def test_initial_state_continues_a_split_sequence():
    """Scanning [0, k) then [k, L) with h0 = the first half's final state equals one scan over [0, L)."""
    inputs = make_inputs(2, 21, 4, 3, inject=True, seed=7)
    y_full, last_full = run(inputs, "parallel")
    k = 8

    def part(sl, h0):
        return selective_scan(
            inputs["x"][:, sl], inputs["delta"][:, sl], inputs["A"], inputs["B"][:, sl], inputs["C"][:, sl],
            inputs["D"], h0=h0, state_inject=inputs["state_inject"][:, sl], return_state=True,
        )

    y1, h1 = part(slice(0, k), None)
    y2, h2 = part(slice(k, None), h1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full)
    torch.testing.assert_close(h2, last_full)


def test_injection_at_first_token_equals_initial_state():
    """h_0 = a_0 (h_{-1} + S_0) + ...: an injection at t = 0 alone acts exactly like h0 = S_0."""
    inputs = make_inputs(1, 10, 3, 2, seed=11)
    s0 = torch.randn(1, 3, 2, dtype=torch.float64)
    inject = torch.zeros(1, 10, 3, 2, dtype=torch.float64)
    inject[:, 0] = s0
    args = (inputs["x"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"])
    torch.testing.assert_close(selective_scan(*args, state_inject=inject), selective_scan(*args, h0=s0))


def test_parallel_scan_is_stable_for_huge_decay_and_long_sequences():
    """delta*A down to -1e3 (exp underflows to 0) and 2000 tokens in float32: finite and equal to the loop."""
    inputs = make_inputs(1, 2000, 4, 3, h0=True, dtype=torch.float32, seed=5)
    with torch.no_grad():
        inputs["delta"][:, ::7] *= 300.0  # some tokens reset the memory completely
        inputs["delta"][:, 1::7] *= 1e-3  # others keep it almost unchanged
    y_p, last_p = run(inputs, "parallel")
    y_s, last_s = run(inputs, "sequential")
    assert torch.isfinite(y_p).all() and torch.isfinite(last_p).all()
    torch.testing.assert_close(y_p, y_s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last_p, last_s, rtol=1e-4, atol=1e-4)
    y_p.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in inputs.values() if v is not None)


def test_half_precision_inputs_are_computed_in_float32():
    inputs = make_inputs(1, 12, 3, 2, dtype=torch.float32, seed=2)
    args = [inputs[k].detach() for k in ("x", "delta", "A", "B", "C", "D")]
    y32 = selective_scan(*args)
    y16 = selective_scan(*[a.to(torch.bfloat16) for a in args])
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    "name, shape",
    [("delta", (2, 5, 4)), ("A", (3, 3)), ("B", (2, 5, 3)), ("C", (2, 4, 2)), ("D", (4,)), ("h0", (2, 3, 3)),
     ("state_inject", (2, 5, 3, 1))],
)
def test_shape_mismatch_raises(name, shape):
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(2, 5, 3, 2, h0=True, inject=True).items()}
    inputs[name] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=name):
        run(inputs, "parallel")


def test_unknown_method_raises():
    inputs = make_inputs(1, 3, 2, 2)
    with pytest.raises(ValueError, match="method"):
        run(inputs, "fft")


def test_flop_counter_counts_each_scan():
    plain = make_inputs(2, 10, 3, 4)
    injected = make_inputs(2, 10, 3, 4, inject=True)
    with count_scan_flops() as box:
        run(plain, "parallel")
        run(injected, "parallel")
    elements = 2 * 10 * 3 * 4
    assert box[0] == elements * SCAN_FLOPS_PER_ELEMENT + elements * (SCAN_FLOPS_PER_ELEMENT + SCAN_INJECT_FLOPS_PER_ELEMENT)
    with count_scan_flops() as box2:
        pass
    assert box2[0] == 0


# ------------------------------------------------------------------------------------------- the block
def test_mamba_block_shapes_and_initialisation():
    torch.manual_seed(0)
    block = MambaBlock(dim=8, d_state=4, expand=2, d_conv=3)
    assert block.d_inner == 16 and block.dt_rank == math.ceil(8 / 16)
    torch.testing.assert_close(-torch.exp(block.A_log[0]), -torch.arange(1, 5, dtype=torch.float32))
    x = torch.randn(3, 11, 8)
    u, z, delta, a, b, c = block.ssm_inputs(x)
    assert u.shape == z.shape == delta.shape == (3, 11, 16)
    assert b.shape == c.shape == (3, 11, 4) and a.shape == (16, 4)
    assert (delta > 0).all() and (a < 0).all()
    dt0 = F.softplus(block.dt_proj.bias)
    assert (dt0 > 0.9e-3).all() and (dt0 < 0.11).all()
    y = block(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    h0 = torch.randn(3, 16, 4)
    inject = torch.randn(3, 11, 16, 4)
    assert block(x, h0=h0, state_inject=inject).shape == x.shape
    assert not torch.allclose(block(x, h0=h0), y)


def test_mamba_block_parallel_equals_sequential_with_gradients():
    torch.manual_seed(1)
    block = MambaBlock(dim=6, d_state=3, expand=2, d_conv=4).double()
    x = torch.randn(2, 19, 6, dtype=torch.float64, requires_grad=True)
    inject = torch.randn(2, 19, 12, 3, dtype=torch.float64)
    outs = {}
    for method in ("parallel", "sequential"):
        block.scan_method = method
        y = block(x, state_inject=inject)
        grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
        outs[method] = (y, grads)
    torch.testing.assert_close(outs["parallel"][0], outs["sequential"][0])
    for g_p, g_s in zip(outs["parallel"][1], outs["sequential"][1]):
        torch.testing.assert_close(g_p, g_s)


def test_mamba_block_is_causal():
    """Changing token t changes no output before t (causal conv + forward scan)."""
    torch.manual_seed(2)
    block = MambaBlock(dim=8, d_state=4, expand=2, d_conv=4)
    x = torch.randn(1, 16, 8)
    x2 = x.clone()
    x2[:, 10] += 1.0
    y, y2 = block(x), block(x2)
    torch.testing.assert_close(y[:, :10], y2[:, :10])
    assert not torch.allclose(y[:, 10:], y2[:, 10:])
