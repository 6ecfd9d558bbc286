"""The Mamba2 mixer (Dao & Gu 2024), with HF transformers' parameter names and shapes.

in_proj -> [z | xBC | dt]; xBC -> causal depthwise conv -> SiLU -> [x | B | C]; SSD scan with
dt = softplus(dt + dt_bias) (no clamp) and A = -exp(A_log); y + D * x; gated group RMSNorm with z;
out_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MambaMoEConfig
from ..ops.conv import causal_conv1d, causal_conv1d_step, conv_state_at
from ..ops.dtypes import cast
from ..ops.kernels import ssd_chunked_triton, triton_supports
from ..ops.kernels.conv_triton import causal_conv1d_triton
from ..ops.kernels.conv_triton import use_in_model as use_triton_conv
from ..ops.ssd import ssd_chunked, ssd_step
from .cache import MambaState
from .norms import GatedRMSNorm


class Mamba2Mixer(nn.Module):
    def __init__(self, config: MambaMoEConfig) -> None:
        super().__init__()
        self.d_model = config.d_model
        self.d_inner = config.ssm_d_inner
        self.num_heads = config.ssm_num_heads
        self.head_dim = config.ssm_head_dim
        self.ngroups = config.ssm_ngroups
        self.d_state = config.ssm_state_size
        self.kernel = config.ssm_conv_kernel
        self.chunk_size = config.ssm_chunk_size
        self.conv_dim = config.ssm_conv_dim

        self.in_proj = nn.Linear(self.d_model, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                padding=self.kernel - 1, bias=config.ssm_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.ngroups, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)
        self._init_ssm(config)

    def _init_ssm(self, config: MambaMoEConfig) -> None:
        # dt ~ log-uniform in [dt_min, dt_max], stored through softplus's inverse; A ~ U[a_min, a_max].
        with torch.no_grad():
            dt = torch.exp(torch.rand(self.num_heads) * (math.log(config.ssm_dt_max) - math.log(config.ssm_dt_min))
                           + math.log(config.ssm_dt_min)).clamp(min=config.ssm_dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(self.num_heads).uniform_(config.ssm_a_init_min,
                                                                            config.ssm_a_init_max)))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def new_state(self, batch_size: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> MambaState:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return MambaState(
            conv=torch.zeros(batch_size, self.conv_dim, self.kernel - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.num_heads, self.head_dim, self.d_state, device=device,
                            dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        )

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        shape = xbc.shape[:-1]
        return (x.reshape(*shape, self.num_heads, self.head_dim), B.reshape(*shape, self.ngroups, self.d_state),
                C.reshape(*shape, self.ngroups, self.d_state))

    def forward(self, hidden: Tensor, mask: Tensor | None = None, state: MambaState | None = None,
                seq_idx: Tensor | None = None) -> Tensor:
        """hidden (b, l, d_model); mask (b, l) bool, False = padding; state updated in place if given;
        seq_idx (b, l): packed documents, each scanned as if alone (training; not with a state)."""
        b, l, _ = hidden.shape
        if state is not None and l == 1 and mask is None:
            return self.step(hidden, state)
        z, xbc, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        weight = self.conv1d.weight[:, 0, :]
        scan_dtype = torch.promote_types(hidden.dtype, torch.float32)  # the scan runs in >= fp32
        A = -torch.exp(self.A_log.to(scan_dtype))
        dt = F.softplus(dt.to(scan_dtype) + self.dt_bias.to(scan_dtype))
        if mask is not None:
            # Padding feeds zeros to the conv and has dt = 0, so it leaves both states untouched.
            xbc = xbc * mask[..., None].to(xbc.dtype)
            dt = dt * mask[..., None]

        if state is None and xbc.is_cuda and use_triton_conv(xbc, weight):
            # Training and stateless forwards on CUDA (MAMBA_MOE_TRITON_CONV=0 turns it off): conv + SiLU in
            # one Triton pass over in_proj's slice (no transposes, no copies).
            x, B, C = self._split_xbc(causal_conv1d_triton(xbc, weight, self.conv1d.bias, seq_idx))
        else:
            conv_out, conv_final = causal_conv1d(xbc, weight, self.conv1d.bias,
                                                 None if state is None else state.conv, seq_idx=seq_idx)
            x, B, C = self._split_xbc(F.silu(conv_out))
        init = None if state is None else state.ssm
        # The Triton kernels (same math) from one chunk up. Shorter calls (short prompts, prefill
        # tails) take the PyTorch path: compute-sanitizer showed the chunk-scan kernel reading shared
        # memory out of bounds for an 8-token bf16 prefill on an H100 (docs/kernels.md, open bug).
        if x.is_cuda and l >= self.chunk_size and triton_supports(x, B, self.chunk_size):
            y, ssm_final = ssd_chunked_triton(x, dt, A, B, C, self.chunk_size, self.D, init, seq_idx)
        else:
            y, ssm_final = ssd_chunked(x, dt, A, B, C, self.chunk_size, self.D, init, seq_idx)
        if state is not None:
            if mask is not None:  # right padding: the conv state ends at each row's last real token
                positions = torch.arange(l, device=hidden.device).expand(b, l)
                last = torch.where(mask, positions, -1).max(dim=1).values
                conv_final = conv_state_at(xbc, state.conv, last, self.kernel)
            state.conv, state.ssm = conv_final.to(state.conv.dtype), ssm_final
        y = y.reshape(b, l, self.d_inner).to(hidden.dtype)
        return self.out_proj(self.norm(y, z))

    def step(self, hidden: Tensor, state: MambaState) -> Tensor:
        """One token per row: hidden (b, 1, d_model) -> (b, 1, d_model), ``state`` advanced by that token.

        The decode step (``forward`` with a state and one unmasked token comes here). Without autograd the
        state is updated in place, so its storage never moves (what CUDA-graph decode captures) and no
        state tensor is allocated per token; with autograd it is replaced by new tensors.
        """
        b = hidden.shape[0]
        z, xbc, dt = torch.split(self.in_proj(hidden[:, 0]), [self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        inplace = not torch.is_grad_enabled()
        if inplace and not state.ssm.is_contiguous():
            state.ssm = state.ssm.contiguous()  # a prefill leaves a strided view: copied once, then in place
        if inplace and not state.conv.is_contiguous():
            state.conv = state.conv.contiguous()
        conv_out, state.conv = causal_conv1d_step(xbc, state.conv, self.conv1d.weight[:, 0, :], self.conv1d.bias,
                                                  inplace)
        # x, B and C in the scan's dtype with one cast (the scan would cast each of them anyway).
        x, B, C = self._split_xbc(cast(F.silu(conv_out), state.ssm.dtype))
        A, dt_bias, D = self._scan_constants(state.ssm.dtype)
        dt = F.softplus(cast(dt, A.dtype) + dt_bias)
        y, state.ssm = ssd_step(state.ssm, x, dt, A, B, C, D, inplace)
        y = cast(y.reshape(b, 1, self.d_inner), hidden.dtype)
        return self.out_proj(self.norm(y, z[:, None]))

    def _scan_constants(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(A = -exp(A_log), dt_bias, D) in the scan's dtype.

        Without autograd they are computed once and reused until a parameter changes (tracked by its
        version counter and storage): a bf16 decode step would otherwise spend three of its few dozen
        kernels per layer recomputing constants (measured: ~9% of a CUDA-graph step of mamba-moe-300m).
        """
        params = (self.A_log, self.dt_bias, self.D)
        if torch.is_grad_enabled():
            return -torch.exp(cast(self.A_log, dtype)), cast(self.dt_bias, dtype), cast(self.D, dtype)
        key = (dtype,) + tuple((p.data_ptr(), p._version, p.device) for p in params)
        cached = getattr(self, "_constants", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                values = (-torch.exp(cast(self.A_log, dtype)), cast(self.dt_bias, dtype).clone(),
                          cast(self.D, dtype).clone())
            self._constants = cached = (key, values)
        return cached[1]
