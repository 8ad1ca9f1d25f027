"""jaxspeech.decoding: greedy, beam and streaming transducer search (jit-compiled, static shapes).

The searches are plain functions on arrays and two callables (see `greedy.py` for the contract);
`transducer_greedy` / `transducer_beam` run them on a `jaxspeech.models.TransformerTransducer`.
"""

from jaxspeech.decoding.beam import beam_search, transducer_beam
from jaxspeech.decoding.greedy import (
    greedy_search,
    greedy_search_with_state,
    model_callables,
    transducer_greedy,
)

__all__ = [
    "beam_search",
    "greedy_search",
    "greedy_search_with_state",
    "model_callables",
    "transducer_beam",
    "transducer_greedy",
]
