"""Selective state-space scan (S6, "Mamba") in pure PyTorch, and the Mamba block built on it.

The selective scan of Gu & Dao (2023) with diagonal state matrix, per token t, inner channel d and state n::

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * (h_{t-1}[d, n] + S_t[d, n]) + delta_t[d] * B_t[n] * x_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * x_t[d]

with ``h_{-1} = h0`` (zero by default). ``S`` is an optional per-token *state injection* (zero in a plain
Mamba); it carries the DAPL states into the Spatial Mamba of OUFR (paper eq. 3, see ``docs/network.md``).

Two implementations share this definition:

* ``method="sequential"``: the recurrence above as a Python loop over t. Slow; it is the reference.
* ``method="parallel"``: an odd/even (cyclic-reduction) parallel scan of the first-order linear recurrence
  ``h_t = a_t * h_{t-1} + b_t``. Each of its ⌈log2 L⌉ levels halves the sequence with whole-tensor
  operations (no Python loop over the sequence), total work O(L), depth O(log L). It is numerically safe:
  the only exponentials are ``a_t = exp(delta_t * A) ∈ (0, 1]`` (delta > 0, A < 0), every product of
  ``a``'s stays in [0, 1], so nothing can overflow; underflow to 0 is the exact limit of a vanishing
  memory. The backward pass is hand-written (a custom autograd function): the adjoint of a linear
  recurrence is the same recurrence run in reverse, so backward costs one more parallel scan and stores only
  the inputs and the states h (not the scan's intermediate levels).

Shapes (``Bt`` batch, ``L`` sequence length, ``Di`` inner channels, ``N`` state size):

=============  ====================  ======================================================
``x``          (Bt, L, Di)           input sequence
``delta``      (Bt, L, Di)           positive step sizes (already through softplus)
``A``          (Di, N)               negative-real diagonal state matrix
``B``, ``C``   (Bt, L, N)            input and output projections (selective: per token)
``D``          (Di,)                 skip connection (optional)
``h0``         (Bt, Di, N)           initial state (optional)
``state_inject`` (Bt, L, Di, N)      per-token state injection S (optional)
``y``          (Bt, L, Di)           output; final state h_{L-1} is (Bt, Di, N)
=============  ====================  ======================================================
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "selective_scan",
    "linear_scan",
    "MambaBlock",
    "count_scan_flops",
    "SCAN_FLOPS_PER_ELEMENT",
]

#: Element-wise FLOPs per (token, inner channel, state) of the recurrence, as counted by
#: :func:`count_scan_flops`: delta*A (1), exp (1), delta*x*B (1, delta*x is shared over the states),
#: a*h + b (2). A state injection adds a*S and its sum (2). The contraction with C is a matrix product and is
#: counted by ``torch.utils.flop_counter`` itself.
SCAN_FLOPS_PER_ELEMENT = 5
SCAN_INJECT_FLOPS_PER_ELEMENT = 2

_FLOP_COUNTERS: List[List[int]] = []


@contextlib.contextmanager
def count_scan_flops() -> Iterator[List[int]]:
    """Count the element-wise work of every selective scan run inside the ``with`` block.

    ``torch.utils.flop_counter.FlopCounterMode`` sees matrix products and convolutions only; the scan's
    recurrence is element-wise. Yields a one-element list whose entry holds the analytic FLOP count
    (``SCAN_FLOPS_PER_ELEMENT`` per (batch, token, channel, state), plus
    ``SCAN_INJECT_FLOPS_PER_ELEMENT`` with a state injection) once the block has run.
    """
    box = [0]
    _FLOP_COUNTERS.append(box)
    try:
        yield box
    finally:
        _FLOP_COUNTERS.remove(box)


def _record_flops(x: torch.Tensor, n_state: int, injected: bool) -> None:
    if not _FLOP_COUNTERS:
        return
    per = SCAN_FLOPS_PER_ELEMENT + (SCAN_INJECT_FLOPS_PER_ELEMENT if injected else 0)
    flops = per * x.shape[0] * x.shape[1] * x.shape[2] * n_state
    for box in _FLOP_COUNTERS:
        box[0] += flops


# --------------------------------------------------------------------------------------------------
# The parallel first-order linear recurrence
# --------------------------------------------------------------------------------------------------
def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan ``h_t = a_t * h_{t-1} + b_t`` along dim 1 with ``h_{-1} = 0`` (odd/even reduction).

    Args:
        a: (Bt, L, ...) multipliers; for stability they should lie in [0, 1] (they do in the SSM).
        b: (Bt, L, ...) additive terms, same shape as ``a``.

    Returns:
        (Bt, L, ...) the states h. Level k combines neighbouring pairs of the level k-1 sequence
        ((a1, b1), (a2, b2)) -> (a1 a2, a2 b1 + b2), recurses on the half-length sequence (whose scan
        gives the states at odd positions) and then fills the even positions with one multiply-add.
        Autograd differentiates through it, but :func:`selective_scan` uses its own adjoint.
    """
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a {tuple(a.shape)} and b {tuple(b.shape)} differ")
    length = a.shape[1]
    if length == 1:
        return b.clone()
    pairs = length // 2
    a_even, a_odd = a[:, 0 : 2 * pairs : 2], a[:, 1 : 2 * pairs : 2]
    b_even, b_odd = b[:, 0 : 2 * pairs : 2], b[:, 1 : 2 * pairs : 2]
    h_odd = linear_scan(a_even * a_odd, torch.addcmul(b_odd, a_odd, b_even))  # states at 1, 3, 5, ...
    h = torch.empty_like(b)
    h[:, 1 : 2 * pairs : 2] = h_odd
    h[:, 0] = b[:, 0]
    n_rest = (length - 1) // 2  # even positions 2, 4, ... need the odd state just before them
    if n_rest > 0:
        h[:, 2::2] = torch.addcmul(b[:, 2::2], a[:, 2::2], h_odd[:, :n_rest])
    return h


def _reverse_linear_scan(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Adjoint scan ``r_t = g_t + a_{t+1} * r_{t+1}`` (``r_{L-1} = g_{L-1}``) along dim 1."""
    a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
    return linear_scan(a_next.flip(1), g.flip(1)).flip(1)


def _scan_terms(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    h0: Optional[torch.Tensor],
    inject: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multipliers a = exp(delta A) and additive terms b of the recurrence, both (Bt, L, Di, N)."""
    a = torch.exp(delta.unsqueeze(-1) * A)
    b = (delta * x).unsqueeze(-1) * B.unsqueeze(2)
    if inject is not None:
        b = torch.addcmul(b, a, inject)
    if h0 is not None:
        b[:, 0] = torch.addcmul(b[:, 0], a[:, 0], h0)
    return a, b


class _SelectiveScanFn(torch.autograd.Function):
    """Parallel selective scan with a hand-written adjoint (one reverse parallel scan)."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, h0, inject):  # type: ignore[override]
        a, b = _scan_terms(x, delta, A, B, h0, inject)
        h = linear_scan(a, b)
        del a, b
        y = torch.einsum("bldn,bln->bld", h, C)
        if D is not None:
            y = y + x * D
        ctx.save_for_backward(x, delta, A, B, C, D, h0, inject, h)
        last = h[:, -1].clone()
        return y, last

    @staticmethod
    def backward(ctx, gy, g_last):  # type: ignore[override]
        x, delta, A, B, C, D, h0, inject, h = ctx.saved_tensors
        a = torch.exp(delta.unsqueeze(-1) * A)
        g_c = torch.einsum("bld,bldn->bln", gy, h)
        g_h = gy.unsqueeze(-1) * C.unsqueeze(2)
        if g_last is not None:
            g_h[:, -1] += g_last
        g_b = _reverse_linear_scan(a, g_h)
        del g_h
        # d h_t / d a_t = h_{t-1} + S_t, with h_{-1} = h0
        g_a = g_b * inject if inject is not None else torch.zeros_like(g_b)
        g_a[:, 1:] += g_b[:, 1:] * h[:, :-1]
        if h0 is not None:
            g_a[:, 0] += g_b[:, 0] * h0
        g_inject = g_b * a if inject is not None and ctx.needs_input_grad[7] else None
        g_h0 = g_b[:, 0] * a[:, 0] if h0 is not None and ctx.needs_input_grad[6] else None
        g_da = g_a * a  # gradient w.r.t. delta*A
        del g_a, a
        g_bb = torch.einsum("bldn,bln->bld", g_b, B)  # sum_n g_b * B
        g_delta = (g_da * A).sum(-1) + x * g_bb
        g_A = torch.einsum("bldn,bld->dn", g_da, delta)
        g_x = delta * g_bb
        g_B = torch.einsum("bldn,bld->bln", g_b, delta * x)
        g_D = None
        if D is not None:
            g_x = g_x + gy * D
            g_D = (gy * x).sum(dim=(0, 1))
        return g_x, g_delta, g_A, g_B, g_c, g_D, g_h0, g_inject


_Opt = Optional[torch.Tensor]


def _sequential_scan(
    x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: _Opt, h0: _Opt, inject: _Opt,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: the recurrence of the module docstring as a loop over tokens; returns (y, final state)."""
    bt, length, d_inner = x.shape
    h = h0 if h0 is not None else x.new_zeros(bt, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        a_t = torch.exp(delta[:, t].unsqueeze(-1) * A)
        prev = h if inject is None else h + inject[:, t]
        h = a_t * prev + (delta[:, t] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(1)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D
    return y, h


def _check_shapes(
    x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: _Opt, h0: _Opt, inject: _Opt,
) -> None:
    if x.dim() != 3:
        raise ValueError(f"selective_scan: x must be (batch, length, d_inner); got {tuple(x.shape)}")
    bt, length, d_inner = x.shape
    n_state = A.shape[-1] if A.dim() == 2 else -1
    expected = {
        "delta": (delta, (bt, length, d_inner)),
        "A": (A, (d_inner, n_state)),
        "B": (B, (bt, length, n_state)),
        "C": (C, (bt, length, n_state)),
    }
    if D is not None:
        expected["D"] = (D, (d_inner,))
    if h0 is not None:
        expected["h0"] = (h0, (bt, d_inner, n_state))
    if inject is not None:
        expected["state_inject"] = (inject, (bt, length, d_inner, n_state))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                f"for x of shape (batch={bt}, length={length}, d_inner={d_inner}) and A of shape {tuple(A.shape)}"
            )


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    h0: Optional[torch.Tensor] = None,
    method: str = "parallel",
    return_state: bool = False,
    state_inject: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Run the selective scan (S6) defined in the module docstring.

    Args:
        x: (Bt, L, Di) inputs.
        delta: (Bt, L, Di) positive step sizes.
        A: (Di, N) state matrix diagonal (negative for a decaying memory).
        B, C: (Bt, L, N) per-token input / output projections.
        D: optional (Di,) skip weights (``y += D * x``).
        h0: optional (Bt, Di, N) initial state ``h_{-1}``.
        method: ``"parallel"`` (odd/even parallel scan, custom adjoint) or ``"sequential"`` (reference loop).
        return_state: also return the final state h_{L-1}.
        state_inject: optional (Bt, L, Di, N) state S_t added to the previous state before the decay.

    Returns:
        y of shape (Bt, L, Di), and with ``return_state`` the final state (Bt, Di, N). Half-precision inputs
        are computed in float32 and y is returned in ``x``'s dtype; the state stays float32.
    """
    _check_shapes(x, delta, A, B, C, D, h0, state_inject)
    if method not in ("parallel", "sequential"):
        raise ValueError(f"selective_scan: method must be 'parallel' or 'sequential', got {method!r}")
    out_dtype = x.dtype
    work = torch.promote_types(x.dtype, A.dtype)
    if work in (torch.float16, torch.bfloat16):
        work = torch.float32
    args = [t if t is None else t.to(work) for t in (x, delta, A, B, C, D, h0, state_inject)]
    _record_flops(x, A.shape[-1], state_inject is not None)
    autocast_off = torch.autocast(device_type=x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") \
        else contextlib.nullcontext()
    with autocast_off:
        if method == "parallel":
            y, last = _SelectiveScanFn.apply(*args)
        else:
            y, last = _sequential_scan(*args)
    y = y.to(out_dtype)
    return (y, last) if return_state else y


# --------------------------------------------------------------------------------------------------
# The Mamba block
# --------------------------------------------------------------------------------------------------
class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block on token sequences (B, L, dim) -> (B, L, dim).

    ``out = x + out_proj(SSM(SiLU(conv1d(x_in))) * SiLU(z))`` with ``(x_in, z) = in_proj(LayerNorm(x))``:

    * ``in_proj``: Linear(dim, 2 Di), Di = expand * dim (the SSM branch and the gate z);
    * a causal depthwise Conv1d (kernel ``d_conv``) along the sequence, then SiLU;
    * ``x_proj``: Linear(Di, R + 2N) -> (delta_low, B, C) with R = ⌈dim / 16⌉ (the "dt rank");
    * ``dt_proj``: Linear(R, Di), delta = softplus(dt_proj(delta_low)) > 0, bias initialised so that
      delta starts log-uniform in [dt_min, dt_max];
    * ``A = -exp(A_log)`` (Di, N), initialised to -[1, 2, ..., N] per channel (S4D-real); ``D`` (Di,) ones;
    * :func:`selective_scan`, gated by SiLU(z), projected back by ``out_proj`` (Linear(Di, dim)).

    Args:
        dim: token width M.
        d_state: N, state size.
        expand: Di / dim.
        d_conv: kernel of the causal depthwise convolution.
        scan_method: ``"parallel"`` or ``"sequential"`` (the reference; used by the tests).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan_method: str = "parallel",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.d_state = d_state
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16)
        self.scan_method = scan_method
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim)
        self._dt_range = (dt_min, dt_max)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of A, D and the delta projection."""
        dt_min, dt_max = self._dt_range
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
            u = torch.rand(self.d_inner, device=self.dt_proj.bias.device)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
            self.D.fill_(1.0)

    def ssm_inputs(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Normalise and project tokens (B, L, dim) -> (u, z, delta, A, B, C) for the scan (see class doc)."""
        length = tokens.shape[1]
        xz = self.in_proj(self.norm(tokens))
        u, z = xz.chunk(2, dim=-1)
        u = self.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2)  # causal: keep the first L outputs
        u = F.silu(u)
        dt_low, b, c = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_low))
        a = -torch.exp(self.A_log.float())
        return u, z, delta, a, b, c

    def forward(
        self,
        tokens: torch.Tensor,
        h0: Optional[torch.Tensor] = None,
        state_inject: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            tokens: (B, L, dim).
            h0: optional (B, Di, N) initial SSM state.
            state_inject: optional (B, L, Di, N) per-token state injection (see :func:`selective_scan`).

        Returns:
            (B, L, dim) = tokens + mixer output.
        """
        u, z, delta, a, b, c = self.ssm_inputs(tokens)
        y = selective_scan(u, delta, a, b, c, self.D, h0=h0, state_inject=state_inject, method=self.scan_method)
        return tokens + self.out_proj(y * F.silu(z))
