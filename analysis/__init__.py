"""Reports: visual-token alignment, attention-region divergence, CLIP-blind pairs, layer similarity."""
