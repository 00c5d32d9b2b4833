"""archscope backend package: hybrid language models whose sequence mixers keep a recurrent state
(gated delta nets, short convolutions, lightning attention) beside full-attention layers."""

__version__ = "0.3.0"
