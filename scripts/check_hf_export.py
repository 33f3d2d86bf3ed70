#!/usr/bin/env python3
"""Checks `switchyard export-hf` with `transformers` itself (#21).

    python3 scripts/check_hf_export.py --switchyard BIN --config CONFIG --checkpoint DIR
        --formats mixtral,qwen2_moe --work DIR [--prompt TEXT] [--tokens 32]

Exports the checkpoint in each format (fp32 and bf16), loads it with
`AutoModelForCausalLM` / `AutoTokenizer`, and compares:
  - the tokenizer's ids with Switchyard's (a byte-level run: the UTF-8 bytes);
  - the logits of every prompt position with Switchyard's (`generate --logits-out`):
    relative difference (max |a - b| / max |b|) within 1e-4 in fp32;
  - bf16: every tensor is its fp32 export rounded to the nearest bf16 (exactly), and the
    logits' difference is printed (rounding the weights moves them; a barely trained model
    with small logits and near-tied routing moves the most);
  - the mean next-token loss on the validation windows `switchyard eval` evaluates
    (`eval --tokens-out`) with the loss it prints: within 1e-4 nats (fp32);
  - greedy generation of N tokens: `model.generate(do_sample=False)` against
    `switchyard generate --temperature 0`, with and without Switchyard's KV cache, token
    for token.
Exit 0 when every check holds; 1 otherwise. Needs torch and transformers (CPU).
"""

import argparse
import json
import re
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


def load_dir(path):
    """Every tensor of a model directory's safetensors files, by name."""
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--switchyard", required=True)
    ap.add_argument("--config", required=True, help="the run's config (for `switchyard eval`)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--formats", default="mixtral")
    ap.add_argument("--work", default=None)
    ap.add_argument("--prompt", default="ROMEO:\nWhat light through yonder")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], help="passed to `switchyard eval`")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    failures = []

    logits_file = work / "switchyard-logits.npy"
    generate = [args.switchyard, "generate", "--checkpoint", args.checkpoint, "--prompt", args.prompt,
                "--temperature", "0", "--max-new-tokens", str(args.tokens)]
    text = run(generate + ["--logits-out", str(logits_file)])
    uncached = run(generate + ["--no-kv-cache"])
    print(f"switchyard greedy {args.tokens} tokens identical with and without the KV cache: {text == uncached}")
    if text != uncached:
        failures.append(f"KV cache changes greedy text:\n  cached:   {text!r}\n  uncached: {uncached!r}")
    ours_logits = np.load(logits_file)
    ours_text = text[:-1] if text.endswith("\n") else text

    windows_file = work / "eval-windows.npy"
    sets = [a for s in args.set for a in ("--set", s)]
    evaluated = run([args.switchyard, "eval", "--config", args.config, "--checkpoint", "auto",
                     "--tokens-out", str(windows_file)] + sets)
    eval_loss = float(re.search(r"valid loss ([0-9.]+)", evaluated).group(1))
    windows = torch.from_numpy(np.load(windows_file))

    for fmt in args.formats.split(","):
        for dtype, tol in [("fp32", 1e-4), ("bf16", None)]:
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
                  f"relative difference {rel:.2e}" + (f" (tolerance {tol:g})" if tol else " (not checked)"))
            if tol is not None and rel > tol:
                failures.append(f"{fmt} {dtype}: logits differ by {rel:.2e} > {tol:g}")
            if dtype != "fp32":
                fp32 = {k: v for k, v in load_dir(work / f"{fmt}-fp32").items()}
                bf16 = load_dir(out)
                wrong = [k for k in fp32 if k not in bf16 or bf16[k].dtype != torch.bfloat16
                         or not torch.equal(fp32[k].to(torch.bfloat16), bf16[k])]
                print(f"{fmt} bf16: {len(bf16)} tensors, each the fp32 export rounded to nearest "
                      f"bf16: {not wrong and len(bf16) == len(fp32)}")
                if wrong or len(bf16) != len(fp32):
                    failures.append(f"{fmt} bf16: tensors not the rounded fp32 ones: {wrong[:5]}")
                continue
            with torch.no_grad():
                logits = model(windows[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
            print(f"{fmt}: loss on the {windows.shape[0]} windows `switchyard eval` evaluates: "
                  f"transformers {loss:.6f}, switchyard eval {eval_loss:.6f} (tolerance 1e-4)")
            if abs(loss - eval_loss) > 1e-4:
                failures.append(f"{fmt}: loss {loss:.6f} vs switchyard eval's {eval_loss:.6f}")
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
