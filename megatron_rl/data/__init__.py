"""Prompt data: local parquet/jsonl datasets (DAPO layout or simple), chat templates, a resumable sampler,
and synthetic verifiable tasks (``megatron_rl.data.synthetic``).

Importing this package does not import ``datasets`` or ``transformers`` (reward workers import the synthetic
verifiers through it); they are imported when a dataset is built.
"""
from megatron_rl.data.config import PromptDataConfig
from megatron_rl.data.dataset import DataReport, PromptDataset, PromptExample, build_prompt_dataset
from megatron_rl.data.errors import DataError, RowIssue
from megatron_rl.data.sampler import ResumableSampler
from megatron_rl.data.templates import render_prompt, render_sft_example, tokenize_prompts

__all__ = [
    "DataError", "DataReport", "PromptDataConfig", "PromptDataset", "PromptExample", "ResumableSampler", "RowIssue",
    "build_prompt_dataset", "render_prompt", "render_sft_example", "tokenize_prompts",
]
