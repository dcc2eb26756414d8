"""python -m megatron_rl.data.synthetic --task arithmetic --difficulty 1 --num-examples 1000 --seed 0 --out x.parquet"""
from __future__ import annotations

import argparse

from megatron_rl.data.synthetic.export import write_synthetic_dataset
from megatron_rl.tasks.registry import SYNTHETIC_TASKS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic verifiable task in the DAPO parquet/jsonl layout.")
    parser.add_argument("--task", required=True, choices=sorted(SYNTHETIC_TASKS))
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--num-examples", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True, help="output path ending in .parquet, .jsonl or .json")
    args = parser.parse_args(argv)
    path = write_synthetic_dataset(args.out, args.task, args.num_examples, args.seed, args.difficulty, args.split)
    print(f"wrote {args.num_examples} {args.task} examples (difficulty {args.difficulty}, seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
