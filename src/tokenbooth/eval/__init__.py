"""Evaluation: DreamBench's metrics (DINO, CLIP-I, CLIP-T: metrics.py), their aggregation and bootstrap
intervals (stats.py), the DreamBench harness (dreambench.py), toy-bench (toybench/), mini's own quality
(mini_quality/) and the instruments' readers (reader.py)."""
