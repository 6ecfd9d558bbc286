"""GPU kernels (Triton), each beside the PyTorch reference it must equal. Import needs no Triton."""

from .ssd_triton import (
    SSDChunkScanTritonFn,
    seq_idx_from_cu_seqlens,
    ssd_chunked_triton,
    ssd_chunked_varlen_ref,
    triton_available,
    triton_supports,
)

__all__ = [
    "SSDChunkScanTritonFn",
    "seq_idx_from_cu_seqlens",
    "ssd_chunked_triton",
    "ssd_chunked_varlen_ref",
    "triton_available",
    "triton_supports",
]
