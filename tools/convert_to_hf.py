#!/usr/bin/env python
"""Convert a megatron_rl checkpoint to a Hugging Face folder. Run with --help for options and examples.

Same as `megatron-rl convert-to-hf`; the logic lives in megatron_rl/checkpoint/convert.py.
"""
import sys

from megatron_rl.commands.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
