#!/usr/bin/env python3
"""Checks `switchyard export-hf` with `transformers` itself (#21).

    python3 scripts/check_hf_export.py --switchyard BIN --checkpoint DIR --work DIR
        [--prompt TEXT] [--tokens 32]

Exports the checkpoint in each format (fp32 and bf16), loads it with
`AutoModelForCausalLM` / `AutoTokenizer`, and compares on the prompt:
  - the tokenizer's ids with Switchyard's (a byte-level run: the UTF-8 bytes);
  - the logits of every prompt position with Switchyard's (`generate --logits-out`):
    relative difference (max |a - b| / max |b|) within 1e-4 in fp32, 2e-2 in bf16;
  - greedy generation of N tokens: `model.generate(do_sample=False)` against
    `switchyard generate --temperature 0`, token for token.
Exit 0 when every check holds; 1 otherwise. Needs torch and transformers (CPU).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(map(str, cmd))}\n{out.stdout}\n{out.stderr}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--switchyard", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--prompt", default="ROMEO:\nWhat light through yonder")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    logits_file = work / "switchyard-logits.npy"
    text = run([args.switchyard, "generate", "--checkpoint", args.checkpoint, "--prompt", args.prompt,
                "--temperature", "0", "--max-new-tokens", str(args.tokens), "--logits-out", str(logits_file)])
    ours_logits = np.load(logits_file)
    ours_text = text[:-1] if text.endswith("\n") else text
    failures = []
    for fmt, dtype, tol in [("mixtral", "fp32", 1e-4), ("mixtral", "bf16", 2e-2)]:
        out = work / f"{fmt}-{dtype}"
        print(run([args.switchyard, "export-hf", "--checkpoint", args.checkpoint, "--format", fmt,
                   "--dtype", dtype, "--out", str(out)]).strip())
        cfg = json.loads((out / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(out)
        ids = tok(args.prompt, add_special_tokens=False).input_ids
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].float().numpy()
        if theirs.shape != ours_logits.shape:
            failures.append(f"{fmt} {dtype}: logits shape {theirs.shape} vs {ours_logits.shape}")
            continue
        rel = float(np.abs(theirs - ours_logits).max() / np.abs(ours_logits).max())
        print(f"{fmt} {dtype} ({cfg['architectures'][0]}): {len(ids)} prompt tokens, logits "
              f"relative difference {rel:.2e} (tolerance {tol:g})")
        if rel > tol:
            failures.append(f"{fmt} {dtype}: logits differ by {rel:.2e} > {tol:g}")
        if dtype == "fp32":
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=args.tokens,
                                     pad_token_id=0, eos_token_id=None)
            theirs_text = args.prompt + tok.decode(gen[0, len(ids):].tolist())
            same = theirs_text == ours_text
            print(f"{fmt} greedy {args.tokens} tokens identical to transformers' generate: {same}")
            if not same:
                failures.append(f"{fmt}: greedy text differs:\n  switchyard:   {ours_text!r}\n  transformers: {theirs_text!r}")
            byte_ids = list(args.prompt.encode())
            if tok.vocab_size == 256 and ids != byte_ids:
                failures.append(f"{fmt}: the tokenizer gives {ids}, Switchyard's bytes are {byte_ids}")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
