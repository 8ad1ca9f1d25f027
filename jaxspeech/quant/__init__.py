"""jaxspeech.quant."""
