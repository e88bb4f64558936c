"""Training entry point: SFT (distilling a teacher's explanations) and GRPO (refining with rewards).

Neither stage is implemented yet: they build on the model, sampler and prompt modules that are in
place (minirank/model.py, generate.py, prompts.py) and land with their own issues. This script says
so plainly instead of pretending to train.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: SFT and GRPO are not implemented yet (see the open issues); "
             "the model, sampler and reranker they build on are in minirank/.")
