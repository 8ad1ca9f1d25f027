"""jaxspeech.data.commands."""
