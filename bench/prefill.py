"""Load time and prefill throughput of a Llama-3.2-3B-shaped model with random weights.

    python bench/prefill.py                       # on CUDA if available: 3B shape, bf16, batch 8 x 1024
    python bench/prefill.py --small --device cpu  # a smoke run of the same code on a CPU

Writes a random checkpoint (bf16 safetensors) once into a temp dir, times `minirank.weights.load_model`
onto the device, then times the forward over the prompt batch (hidden states for every position,
the LM head only at the last one, as the sampler does).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from minirank.model import ModelConfig, Transformer
from minirank.weights import load_model

LLAMA32_3B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=3072,
                  intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                  head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                  tie_word_embeddings=True, torch_dtype="bfloat16",
                  rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192))
SMALL = {**LLAMA32_3B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same family (smoke test)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    hf = SMALL if args.small else LLAMA32_3B
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as d:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Transformer(ModelConfig.from_hf(hf)).state_dict().items()}
        save_file({k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02) for k, s in shapes.items()},
                  str(Path(d) / "model.safetensors"))
        (Path(d) / "config.json").write_text(json.dumps(hf))
        t0 = time.perf_counter()
        model = load_model(d, dtype=torch.bfloat16, device=dev)
        sync()
        load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, hf["vocab_size"], (args.batch, args.seq), device=dev)
    with torch.inference_mode():
        for _ in range(2):  # warm-up (kernels, allocator)
            model.head(model.hidden(ids)[:, -1])
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            model.head(model.hidden(ids)[:, -1])
        sync()
        dt = (time.perf_counter() - t0) / args.iters
    toks = args.batch * args.seq
    flops = 2 * n_params * toks  # matmul FLOPs, ignoring attention's T^2 term
    print(json.dumps({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                      "params": n_params, "load_s": round(load_s, 2), "batch": args.batch, "seq": args.seq,
                      "prefill_tokens_per_s": round(toks / dt), "prefill_tflops": round(flops / dt / 1e12, 1),
                      "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None}))


if __name__ == "__main__":
    main()
