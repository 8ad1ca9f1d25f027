"""jaxspeech.losses: the RNN-T loss on materialized logits and fused with the joint network."""

from jaxspeech.losses.rnnt import rnnt_loss
from jaxspeech.losses.rnnt_fused import rnnt_loss_fused

__all__ = ["rnnt_loss", "rnnt_loss_fused"]
