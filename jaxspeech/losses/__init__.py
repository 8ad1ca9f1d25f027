"""jaxspeech.losses."""
