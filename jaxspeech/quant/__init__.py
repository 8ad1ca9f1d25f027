"""jaxspeech.quant: squashed low-bit quantization-aware training and bit-packed export (issue 6).

Plain functions on arrays and parameter trees, usable from any JAX project:
  fake_quant  per-channel mid-rise uniform quantizer (exactly 2**bits levels), straight-through.
  squash      w = a * f(theta) re-parameterizations (tanh, Gaussian CDF, identity), warm start,
              mean/variance regularizer.
  qat         rules (path regex -> bits, squash, warm-up), qat_init / qat_apply / qat_regularizer,
              bin-occupancy entropy.
  pack        dense b-bit code packing (3 bits really take 3 bits).
  export      one-file artifact (JSON header, packed codes, scales, float leftovers, SHA-256).
"""

from jaxspeech.quant.export import (
    ArtifactError,
    ExportReport,
    export_quantized,
    load_quantized,
)
from jaxspeech.quant.fake_quant import dequantize, fake_quant, levels, quantize
from jaxspeech.quant.pack import pack_codes, packed_nbytes, unpack_codes
from jaxspeech.quant.qat import (
    QATParams,
    QuantRule,
    bin_occupancy_entropy,
    default_rules,
    kernel_entropies,
    qat_apply,
    qat_init,
    qat_regularizer,
    selected,
)
from jaxspeech.quant.squash import (
    default_target_var,
    init_amplitude,
    init_theta,
    moment_penalty,
    reparameterize,
    squash_fn,
)

__all__ = [
    "ArtifactError",
    "ExportReport",
    "QATParams",
    "QuantRule",
    "bin_occupancy_entropy",
    "default_rules",
    "default_target_var",
    "dequantize",
    "export_quantized",
    "fake_quant",
    "init_amplitude",
    "init_theta",
    "kernel_entropies",
    "levels",
    "load_quantized",
    "moment_penalty",
    "pack_codes",
    "packed_nbytes",
    "qat_apply",
    "qat_init",
    "qat_regularizer",
    "quantize",
    "reparameterize",
    "selected",
    "squash_fn",
    "unpack_codes",
]
