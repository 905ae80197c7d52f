"""Evaluation: DreamBench's metrics (DINO, CLIP-I, CLIP-T) and the DreamBench harness."""
