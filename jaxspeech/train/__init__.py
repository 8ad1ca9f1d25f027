"""jaxspeech.train."""
