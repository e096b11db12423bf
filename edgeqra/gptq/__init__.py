"""GPTQ through GPTQModel 7.6 on CPU or CUDA: the format, the quantizers, the loads.

Everything edgeqra knows about GPTQ checkpoints, one concept per module:

* ``format``: the checkpoint's layout (v1 tensors, ``dynamic`` rules, the one "most common
  width" rule :func:`default_bits`, :func:`config_bits`), reading headers and packed
  tensors, dequantizing to W_hat, and the tensor plan of a config without a checkpoint;
* ``runtime``: GPTQModel imported and run quietly, and the stub tokenizer its load insists on;
* ``quantize``: GPTQModel's own loop, one checkpoint per call (the reference);
* ``shared_hessian``: every width from one Hessian per linear (the bank's fast build);
* ``load``: a checkpoint back as the HF model inside (torch kernel, or real kernels per width);
* ``kernels``: which QuantLinear kernels a load may pick, which it picked, their bytes;
* ``random_checkpoint``: a config's shapes with random values, for memory measurement.

Modules inside the package import each other's modules, never this ``__init__``; everyone
else imports from here (``from edgeqra.gptq import load_quantized``). GPTQModel itself is
imported lazily, inside the functions, through :func:`import_gptqmodel`.
"""

from __future__ import annotations

from edgeqra.gptq.format import (
    PACKED_SUFFIXES,
    SUPPORTED_BITS,
    TensorPlan,
    check_3bit_shapes,
    checkpoint_plan,
    config_bits,
    default_bits,
    dequantize_packed,
    dequantized_weights,
    dynamic_overrides,
    meta_model,
    packed_module_bytes,
    packed_tensors,
    quantize_config,
    quantized_prefixes,
    safetensors_headers,
)
from edgeqra.gptq.kernels import allowed_kernels, kernels_by_bits, module_bytes
from edgeqra.gptq.load import load_gptq, load_quantized, restore_dense_tensors
from edgeqra.gptq.quantize import quantize_to_checkpoint
from edgeqra.gptq.random_checkpoint import write_random_checkpoint
from edgeqra.gptq.runtime import (
    VERBOSE_ENV,
    gptqmodel_verbose,
    import_gptqmodel,
    quiet_gptqmodel,
    staged,
)
from edgeqra.gptq.shared_hessian import quantize_shared_hessian, saved_quantize_config

__all__ = [
    "PACKED_SUFFIXES",
    "SUPPORTED_BITS",
    "VERBOSE_ENV",
    "TensorPlan",
    "allowed_kernels",
    "check_3bit_shapes",
    "checkpoint_plan",
    "config_bits",
    "default_bits",
    "dequantize_packed",
    "dequantized_weights",
    "dynamic_overrides",
    "gptqmodel_verbose",
    "import_gptqmodel",
    "kernels_by_bits",
    "load_gptq",
    "load_quantized",
    "meta_model",
    "module_bytes",
    "packed_module_bytes",
    "packed_tensors",
    "quantize_config",
    "quantize_shared_hessian",
    "quantize_to_checkpoint",
    "quantized_prefixes",
    "quiet_gptqmodel",
    "restore_dense_tensors",
    "safetensors_headers",
    "saved_quantize_config",
    "staged",
    "write_random_checkpoint",
]
