"""jaxspeech.decoding."""
