"""jaxspeech.losses: the RNN-T loss on materialized logits and fused with the joint network."""

from jaxspeech.losses.rnnt import rnnt_loss

__all__ = ["rnnt_loss"]
