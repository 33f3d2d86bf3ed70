#!/usr/bin/env python3
"""Independent values of the MoE balance losses and the router z-loss, for
`moe/tests/routing_options.rs` (which runs this script on the inputs it uses and compares).

Written from the papers' definitions, not from Switchyard's code; plain Python, no packages.

Input (JSON, argv[1]): {"logits": [micro-batch][sequence][token][slot], "top_k": K,
"score": "softmax" | "sigmoid"}. Every slot is an FFN expert (Switch's loss).

Output (JSON, stdout), each loss before its coefficient:
- "batch": per micro-batch, N * sum_i f_i * P_i over the micro-batch (Switch Transformer;
  f_i = share of the T*K assignments routed to expert i, P_i = mean over tokens of the
  expert's normalised score);
- "sequence": per micro-batch, the mean over its sequences of the same loss taken over each
  sequence alone (DeepSeek-V3's sequence-wise balance loss);
- "global_batch": one value for the whole step, N * sum_i f_i * P_i with f and P over every
  micro-batch (what Megatron-Core's global aux loss intends);
- "z": per micro-batch, mean over tokens of logsumexp(logits)^2 (ST-MoE).
"""

import json
import math
import sys


def scores(logits, score):
    if score == "softmax":
        m = max(logits)
        e = [math.exp(x - m) for x in logits]
        s = sum(e)
        return [x / s for x in e]
    return [1.0 / (1.0 + math.exp(-x)) for x in logits]


def normalised(s):
    total = sum(s)
    return [x / total for x in s]


def top_k(s, k):
    # Ties to the lower index, as the router.
    return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


def switch_loss(tokens, k, score):
    """tokens: list of logit rows; the loss over exactly these tokens."""
    n = len(tokens[0])
    counts = [0] * n
    prob_sum = [0.0] * n
    for logits in tokens:
        s = scores(logits, score)
        for i in top_k(s, k):
            counts[i] += 1
        for i, p in enumerate(normalised(s)):
            prob_sum[i] += p
    t = len(tokens)
    return n * sum((counts[i] / (t * k)) * (prob_sum[i] / t) for i in range(n))


def z_loss(tokens):
    total = 0.0
    for logits in tokens:
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        total += lse * lse
    return total / len(tokens)


def main():
    spec = json.load(open(sys.argv[1]))
    k, score = spec["top_k"], spec["score"]
    micro = spec["logits"]
    flat = lambda batch: [tok for seq in batch for tok in seq]
    out = {
        "batch": [switch_loss(flat(b), k, score) for b in micro],
        "sequence": [sum(switch_loss(seq, k, score) for seq in b) / len(b) for b in micro],
        "global_batch": switch_loss([tok for b in micro for tok in flat(b)], k, score),
        "z": [z_loss(flat(b)) for b in micro],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
