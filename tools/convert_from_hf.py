#!/usr/bin/env python
"""Convert a Hugging Face folder to a megatron_rl checkpoint. Run with --help for options and examples.

Same as `megatron-rl convert-from-hf`; the logic lives in megatron_rl/checkpoint/convert.py.
"""
import sys

from megatron_rl.commands.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main())
