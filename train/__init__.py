"""COMM trainer (trained baseline): CLIP multi-level + DINOv2 deep-layer fusion into a causal LLM."""
