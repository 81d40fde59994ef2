"""Weight porting between torch state dicts / Hugging Face checkpoints and NNX modules."""
