"""Train a reasoning reranker the InteRank way, one stage per subcommand:

    python train.py data --posts Posts.xml --out data/ --teacher-url URL --teacher-model NAME   # teacher labels
    python train.py sft  --model SPEC --data data/train.jsonl --val data/val.jsonl --out runs/sft  # distil
    python train.py grpo --model SPEC --adapter runs/sft/adapter --data data/train.jsonl --out runs/grpo  # refine
    python train.py recipe --preset cpu-small --out runs/cpu   # all of it, evaluated on held-out sites

`python train.py STAGE --help` lists every option of a stage with its default. Several GPUs:
`torchrun --nproc-per-node N train.py sft ...` (and grpo).
"""

import importlib
import sys

STAGES = {"data": "minirank.datagen", "sft": "minirank.sft", "grpo": "minirank.grpo", "recipe": "minirank.recipe"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(STAGES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
