"""jaxspeech.models: flax.nnx modules of the streaming Transformer transducer.

config       TransducerConfig and logical-axis parameter initializers.
subsampling  causal 4x convolutional subsampling with a streaming step.
attention    chunked masks, rotary positions, multi-head self-attention with a KV cache.
encoder      pre-LN Transformer blocks (with arbitrator gates) and the streaming encoder.
predictor    LSTM and stateless prediction networks.
joint        the joint network.
transducer   TransformerTransducer composing them.
"""

from jaxspeech.models.attention import MultiHeadSelfAttention, chunk_mask, length_mask, rotary
from jaxspeech.models.config import TransducerConfig
from jaxspeech.models.encoder import Encoder, EncoderBlock, FeedForward
from jaxspeech.models.joint import Joint
from jaxspeech.models.predictor import LSTMPredictor, StatelessPredictor, make_predictor
from jaxspeech.models.subsampling import ConvSubsampling
from jaxspeech.models.transducer import FeatureNorm, StreamState, TransformerTransducer

__all__ = [
    "ConvSubsampling",
    "Encoder",
    "EncoderBlock",
    "FeatureNorm",
    "FeedForward",
    "Joint",
    "LSTMPredictor",
    "MultiHeadSelfAttention",
    "StatelessPredictor",
    "StreamState",
    "TransducerConfig",
    "TransformerTransducer",
    "chunk_mask",
    "length_mask",
    "make_predictor",
    "rotary",
]
