#!/usr/bin/env python3
"""Print the README's newcomer command number N (1: install + run the embedded default, 2: run the tests).

.ci/run executes exactly these, so the README can never drift from what CI proves works."""
import re
import sys

text = open("README.md", encoding="utf-8").read()
section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
if len(blocks) != 2:
    sys.exit(f"README 'Quick start' must hold exactly two ```bash blocks, found {len(blocks)}")
print(blocks[int(sys.argv[1]) - 1].strip())
