"""GPU kernels (Triton), each beside the PyTorch reference it must equal. Import needs no Triton."""

from .ce_triton import cross_entropy_sum_triton
from .conv_triton import causal_conv1d_triton, conv_triton_supports
from .ssd_triton import (
    SSDChunkScanTritonFn,
    seq_idx_from_cu_seqlens,
    ssd_chunked_triton,
    ssd_chunked_varlen_ref,
    triton_available,
    triton_supports,
)

__all__ = [
    "causal_conv1d_triton",
    "conv_triton_supports",
    "cross_entropy_sum_triton",
    "SSDChunkScanTritonFn",
    "seq_idx_from_cu_seqlens",
    "ssd_chunked_triton",
    "ssd_chunked_varlen_ref",
    "triton_available",
    "triton_supports",
]
