#!/usr/bin/env python3
"""Checks `switchyard import-hf` with `transformers` itself (#21).

    python3 scripts/check_hf_import.py --switchyard BIN --tokenizer TOKENIZER_JSON --work DIR

Creates tiny random models with `transformers` (`XForCausalLM(config)`, then every
parameter redrawn so that biases and norms are not their zero/one initial values): a
Mixtral (also saved in f16), a Qwen2-MoE (grouped-query attention, q/k/v biases, a gated shared expert, a dense
layer, no top-k renormalisation) and a Qwen3-MoE (grouped-query attention, head_dim not
hidden/heads, q/k norms, attention biases). Saves each sharded in f32 and in bf16, imports it
with `switchyard import-hf`, and compares Switchyard's logits on a prompt (`generate
--logits-out`) with the saved model's, loaded by `AutoModelForCausalLM` in f32: relative
difference (max |a - b| / max |b|) within 1e-4. Each imported model then trains two steps with
`train --init-from` at ep=2 and in one process: the same validation loss.
Then upcycles a random dense Llama: 4 experts copying its MLP, top-2, no noise; and a
partitioned split into 4 experts at top-4: the first forward equals the dense model's within
1e-4 in both. The tokenizer is the byte-level one an export writes.
Exit 0 when every check holds; 1 otherwise.
"""

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from check_hf_export import run  # the same runner (scripts/ is on the path)
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)


def randomized(model, seed):
    """Every parameter redrawn: norms around one, everything else N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--switchyard", required=True)
    ap.add_argument("--tokenizer", required=True, help="a byte-level tokenizer.json")
    ap.add_argument("--work", default=None)
    ap.add_argument("--prompt", default="To be, or not to be: that is the question")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    small = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    models = [
        ("mixtral", MixtralForCausalLM(MixtralConfig(
            **small, num_key_value_heads=4, intermediate_size=96, num_local_experts=4,
            rope_theta=10000.0, sliding_window=None))),
        ("qwen2_moe", Qwen2MoeForCausalLM(Qwen2MoeConfig(
            **small, num_key_value_heads=2, intermediate_size=80, moe_intermediate_size=48,
            shared_expert_intermediate_size=40, num_experts=4, mlp_only_layers=[1],
            norm_topk_prob=False))),
        ("qwen3_moe", Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **small, num_key_value_heads=1, head_dim=24, intermediate_size=80,
            moe_intermediate_size=48, num_experts=4, norm_topk_prob=True, attention_bias=True,
            mlp_only_layers=[1]))),
    ]
    ids = list(args.prompt.encode())
    failures = []
    for seed, (kind, model) in enumerate(models):
        randomized(model, seed)
        dtypes = [(torch.float32, "f32"), (torch.bfloat16, "bf16")]
        if kind == "mixtral":
            dtypes.append((torch.float16, "f16"))
        for dtype, name in dtypes:
            hf_dir, out = work / f"hf-{kind}-{name}", work / f"imported-{kind}-{name}"
            model.to(dtype).save_pretrained(hf_dir, safe_serialization=True, max_shard_size="100KB")
            shutil.copy(args.tokenizer, hf_dir / "tokenizer.json")
            print(run([args.switchyard, "import-hf", "--model", str(hf_dir), "--out", str(out)]).strip())
            logits_file = work / f"logits-{kind}-{name}.npy"
            run([args.switchyard, "generate", "--checkpoint", str(out / "checkpoints"), "--prompt", args.prompt,
                 "--max-new-tokens", "0", "--logits-out", str(logits_file)])
            ours = np.load(logits_file)
            # The reference: the saved weights loaded back in f32 (for bf16: the rounded
            # weights; a fresh load also recomputes RoPE's frequencies in f32, which
            # `model.to(bf16)` rounds).
            reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                theirs = reference(torch.tensor([ids])).logits[0].numpy()
            rel = float(np.abs(theirs - ours).max() / np.abs(theirs).max())
            shards = len(list(hf_dir.glob("*.safetensors")))
            print(f"import of a random {kind} ({name}, {shards} shards): logits relative difference "
                  f"{rel:.2e} (tolerance 1e-4)")
            if rel > 1e-4:
                failures.append(f"{kind} {name}: logits differ by {rel:.2e}")
        # `train --init-from` at another layout: two steps at ep=2 (threads) and in one
        # process end at the same validation loss.
        losses = {}
        for layout in ["1", "2"]:
            text = run([args.switchyard, "train", "--config", str(out / "config.yaml"), "--init-from",
                        str(out / "checkpoints" / "step-00000000"),
                        "--set", f"run.output_dir={work}/train-{kind}-ep{layout}",
                        "--set", f"parallel.ep={layout}", "--set", "train.steps=2",
                        "--set", "data.seq_len=32", "--set", "data.batch_size=4",
                        "--set", "metrics.progress=false"])
            losses[layout] = re.search(r"final: step 2 valid loss ([0-9.]+)", text).group(1)
        print(f"train --init-from the imported {kind}, 2 steps: valid loss {losses['1']} in one "
              f"process, {losses['2']} at ep=2")
        if losses["1"] != losses["2"]:
            failures.append(f"{kind}: init-from at ep=2 ends at {losses['2']}, one process at {losses['1']}")
    # Sparse upcycling: a random dense Llama (grouped-query attention) becomes 4 experts,
    # copies of its MLP at top-2 or a partition of it at top-4, without noise: the first
    # forward is the dense model's.
    lcfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    llama = randomized(LlamaForCausalLM(lcfg), 7)
    hf_dir = work / "hf-llama"
    llama.save_pretrained(hf_dir, safe_serialization=True)
    shutil.copy(args.tokenizer, hf_dir / "tokenizer.json")
    with torch.no_grad():
        theirs = llama(torch.tensor([ids])).logits[0].numpy()
    for split, top_k in [("copy", 2), ("partition", 4)]:
        out = work / f"upcycled-{split}"
        print(run([args.switchyard, "import-hf", "--model", str(hf_dir), "--out", str(out),
                   "--upcycle-experts", "4", "--upcycle-top-k", str(top_k),
                   "--upcycle-split", split]).strip())
        logits_file = work / f"logits-upcycled-{split}.npy"
        run([args.switchyard, "generate", "--checkpoint", str(out / "checkpoints"), "--prompt", args.prompt,
             "--max-new-tokens", "0", "--logits-out", str(logits_file)])
        ours = np.load(logits_file)
        rel = float(np.abs(theirs - ours).max() / np.abs(theirs).max())
        print(f"upcycled Llama ({split}: 4 experts, top-{top_k}, no noise): first forward against the "
              f"dense model's, relative difference {rel:.2e} (tolerance 1e-4)")
        if rel > 1e-4:
            failures.append(f"upcycled ({split}): logits differ by {rel:.2e}")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
