"""jaxspeech: streaming Transformer-transducer speech recognition in JAX/Flax.

Subpackages:
  losses    RNN-T loss (exact, custom VJP) and the fused joint + loss.
  models    flax.nnx modules: subsampling, streaming encoder, predictors, joint, transducer.
  decoding  greedy, beam and streaming transducer search (jit-compiled, static shapes).
  features  log-mel features and SpecAugment in JAX.
  data      corpora (spoken commands, LibriSpeech, manifests), tokenizers, input pipeline.
  train     sharded train step, state, checkpoints, metrics, evaluation.
  quant     quantization-aware training (squashed weights) and low-bit export.
"""

__version__ = "0.1.0"
