"""Synthetic tasks (megatron_rl.tasks) written as prompt datasets, and supervised warm-up pairs.

    write_synthetic_dataset("train.parquet", "arithmetic", 1000, seed=0, difficulty=1)   # DAPO layout
    python -m megatron_rl.data.synthetic --task countdown --difficulty 2 --num-examples 500 --out val.jsonl
"""
from __future__ import annotations

from megatron_rl.data.synthetic.export import SftPair, sft_pairs, write_synthetic_dataset

__all__ = ["SftPair", "sft_pairs", "write_synthetic_dataset"]
