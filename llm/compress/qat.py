"""Quantization-aware training as a gin switch on the shared train path.

    qat.method = "int4"        # or "int8", "nf4"; None (default) = off
    qat.group_size = 32

`qat(loss_fn, logical_axes)` returns loss_fn unchanged when off; when on, the loss sees
`quantize.fake_quantize_params(params)`: every matmul weight quantized and dequantized in the
forward, with the straight-through estimator passing the gradient to the float weights (identity
inside the quantizer's range, zero where clipped). The train step itself is untouched, so the
same switch works for pretraining, continued pretraining and fine-tuning; after training,
`experiments.compress --method=int4` (same group size) stores the weights the model trained
against (the absmax scales of fake-quantized weights are their own scales).
"""

from __future__ import annotations

import gin

from llm.compress import quantize as Q
from llm.train.loss import LossFn


@gin.configurable
def qat(loss_fn: LossFn, abstract_params: dict, logical_axes: dict, method: str | None = None,
        group_size: int = 128, embedding_method: str | None = None) -> LossFn:
    """loss_fn, or loss_fn evaluated at the fake-quantized params (gin: qat.*).
    abstract_params: shapes (to check the group size against every weight now, not at the
    first step); logical_axes: the model's logical axis names."""
    if method is None:
        return loss_fn
    Q.check_params(abstract_params, logical_axes, method, group_size, embedding_method)

    def wrapped(params, batch, *args, **kwargs):
        fq = Q.fake_quantize_params(params, logical_axes, method, group_size, embedding_method)
        return loss_fn(fq, batch, *args, **kwargs)

    return wrapped
