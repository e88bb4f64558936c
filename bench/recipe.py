"""Does the recipe's model rank sites it never saw better than their first stage? `train.py recipe` over
several seeds, then the held-out nDCG@10 per system as mean +- std over the seeds (the README quotes it).

    python bench/recipe.py                                   # cpu-small, seeds 0 1, into runs/recipe-bench
    python bench/recipe.py --preset cpu-small --seeds 0 1 2 --out runs/rb -- --set sft.lr=1e-4

Seed S runs `python train.py recipe --preset P --out OUT/seed-S --set sft.seed=S --set grpo.seed=S [extra]`
(resumable: rerun the same command after an interruption). The untrained base model's judgements do not
depend on the seed: later seeds start with a copy of seed 0's, and only seed 0's wall time is "from an
empty directory". Writes OUT/summary.json and OUT/summary.md.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/recipe-bench")
    ap.add_argument("extra", nargs="*", help="after --: more arguments for train.py recipe (e.g. --set k=v)")
    args = ap.parse_args()
    out = Path(args.out)
    walls, reports = {}, {}
    for seed in args.seeds:
        d = out / f"seed-{seed}"
        first = out / f"seed-{args.seeds[0]}" / "eval"
        if seed != args.seeds[0] and not (d / "eval").exists() and first.is_dir():
            for src in first.glob("*/base/judgements.jsonl"):
                dst = d / "eval" / src.relative_to(first)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
        t = time.time()
        cmd = [sys.executable, str(ROOT / "train.py"), "recipe", "--preset", args.preset, "--out", str(d),
               "--set", f"sft.seed={seed}", "--set", f"grpo.seed={seed}", *args.extra]
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            return 1
        walls[seed] = round(time.time() - t)
        reports[seed] = json.loads((d / "report.json").read_text())

    # {k: {system: [mean over sites, per seed]}}
    from minirank.recipe import mean_over_sites
    per_seed = {s: mean_over_sites(r["results"]) for s, r in reports.items()}
    ks = list(next(iter(per_seed.values())))
    lines = [f"`python bench/recipe.py --preset {args.preset} --seeds {' '.join(map(str, args.seeds))}`: "
             f"held-out nDCG@10, mean over the sites {', '.join(next(iter(reports.values()))['results'])}, "
             f"mean +- std over {len(args.seeds)} seeds (per seed in brackets)", ""]
    summary = {"preset": args.preset, "seeds": args.seeds, "wall_s": walls, "ndcg@10": {}}
    for k in ks:
        lines += [f"| {k} | nDCG@10 | vs first stage | per seed |", "|---|---|---|---|"]
        systems = per_seed[args.seeds[0]][k]
        for name in systems:
            v = [per_seed[s][k][name] for s in args.seeds]
            fs = [per_seed[s][k]["first stage"] for s in args.seeds]
            d = [a - b for a, b in zip(v, fs)]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            summary["ndcg@10"].setdefault(k, {})[name] = {"mean": statistics.mean(v), "std": sd, "per_seed": v}
            lines.append(f"| {name} | {statistics.mean(v):.1f} +- {sd:.1f} | {statistics.mean(d):+.1f} | "
                         f"{' / '.join(f'{x:.1f}' for x in v)} |")
        lines.append("")
    lines.append("Wall time per seed (s): " + ", ".join(f"seed {s} {w}" for s, w in walls.items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
