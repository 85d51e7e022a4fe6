"""Compact model modules, one file per family (Gemma 2, GLM-4, MVP, BigBird-Pegasus,
BertGeneration), built on tritium's kernels."""
