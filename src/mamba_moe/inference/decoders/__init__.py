"""Decode-step variants over the model's own step: packed/int8 weights (``fast``) and CUDA-graph replay."""
