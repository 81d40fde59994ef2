"""PyTorch side of FlowFeat (reference key names): DPT decoder and encoder wrappers for interop."""
