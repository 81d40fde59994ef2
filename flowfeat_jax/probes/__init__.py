"""Dense probes on frozen features: COCO-Stuff-27 segmentation (attention probe, PAMR) and NYUv2 depth (AdaBins-style).

Entry point: `python -m flowfeat_jax.probe --config configs/probe_cocostuff.py` (or configs/probe_nyu.py).
"""
