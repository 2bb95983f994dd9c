"""TVM block-sparse (BSR) convolution kernels and the model_tune pipeline."""


def model_tune(*args, **kwargs):
    """See onnxprune.tvm_kernels.api.model_tune (imported lazily: TVM is an optional extra)."""
    from .api import model_tune as _model_tune

    return _model_tune(*args, **kwargs)


__all__ = ["model_tune"]
