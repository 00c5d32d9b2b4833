"""archscope backend package: recurrent models (torch RNN/GRU/LSTM LMs, RWKV, xLSTM, custom adapter)."""

__version__ = "0.3.0"
