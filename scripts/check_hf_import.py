#!/usr/bin/env python3
"""Checks `switchyard import-hf` with `transformers` itself (#21).

    python3 scripts/check_hf_import.py --switchyard BIN --tokenizer TOKENIZER_JSON --work DIR

Creates a tiny random Mixtral with `transformers` (`MixtralForCausalLM(config)`), saves it
sharded in f32 and in bf16, imports each with `switchyard import-hf`, and compares
Switchyard's logits on a prompt (`generate --logits-out`) with the saved model's, loaded by
`AutoModelForCausalLM` in f32: relative difference (max |a - b| / max |b|) within 1e-4.
Then upcycles a random dense Llama (4 experts copying its MLP, top-2, no noise): the first
forward equals the dense model's within 1e-4. The tokenizer is the byte-level one an export writes.
Exit 0 when every check holds; 1 otherwise.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from check_hf_export import run  # the same runner (scripts/ is on the path)
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--switchyard", required=True)
    ap.add_argument("--tokenizer", required=True, help="a byte-level tokenizer.json")
    ap.add_argument("--work", default=None)
    ap.add_argument("--prompt", default="To be, or not to be: that is the question")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=128, rope_theta=10000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                        initializer_range=0.1)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    ids = list(args.prompt.encode())
    failures = []
    for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        hf_dir, out = work / f"hf-{name}", work / f"imported-{name}"
        model.to(dtype).save_pretrained(hf_dir, safe_serialization=True, max_shard_size="100KB")
        shutil.copy(args.tokenizer, hf_dir / "tokenizer.json")
        print(run([args.switchyard, "import-hf", "--model", str(hf_dir), "--out", str(out)]).strip())
        logits_file = work / f"logits-{name}.npy"
        run([args.switchyard, "generate", "--checkpoint", str(out / "checkpoints"), "--prompt", args.prompt,
             "--max-new-tokens", "0", "--logits-out", str(logits_file)])
        ours = np.load(logits_file)
        # The reference: the saved weights loaded back in f32 (for bf16: the rounded weights;
        # a fresh load also recomputes RoPE's frequencies in f32, which `model.to(bf16)` rounds).
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0].numpy()
        rel = float(np.abs(theirs - ours).max() / np.abs(theirs).max())
        shards = len(list(hf_dir.glob("*.safetensors")))
        print(f"import of a random Mixtral ({name}, {shards} shards): logits relative difference "
              f"{rel:.2e} (tolerance 1e-4)")
        if rel > 1e-4:
            failures.append(f"{name}: logits differ by {rel:.2e}")
    # Sparse upcycling: a random dense Llama becomes 4 experts (copies of its MLP), top-2,
    # without noise: the first forward is the dense model's.
    lcfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(1)
    llama = LlamaForCausalLM(lcfg).eval()
    hf_dir, out = work / "hf-llama", work / "upcycled"
    llama.save_pretrained(hf_dir, safe_serialization=True)
    shutil.copy(args.tokenizer, hf_dir / "tokenizer.json")
    print(run([args.switchyard, "import-hf", "--model", str(hf_dir), "--out", str(out),
               "--upcycle-experts", "4", "--upcycle-top-k", "2"]).strip())
    logits_file = work / "logits-upcycled.npy"
    run([args.switchyard, "generate", "--checkpoint", str(out / "checkpoints"), "--prompt", args.prompt,
         "--max-new-tokens", "0", "--logits-out", str(logits_file)])
    ours = np.load(logits_file)
    with torch.no_grad():
        theirs = llama(torch.tensor([ids])).logits[0].numpy()
    rel = float(np.abs(theirs - ours).max() / np.abs(theirs).max())
    print(f"upcycled Llama (4 experts, top-2, no noise): first forward against the dense "
          f"model's, relative difference {rel:.2e} (tolerance 1e-4)")
    if rel > 1e-4:
        failures.append(f"upcycled: logits differ by {rel:.2e}")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
