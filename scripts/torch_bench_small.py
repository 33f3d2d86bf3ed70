#!/usr/bin/env python3
"""PyTorch baseline for `bench-small`: the same model, batch and optimizer in eager PyTorch
(or `torch.compile`), timed the way `switchyard bench` times Switchyard, for a same-machine
tokens/s ratio (issue: CPU throughput).

    python3 scripts/torch_bench_small.py --threads 2 --steps 6 --warmup 2 [--experts loop|grouped_mm] [--compile]

Mirrors configs/bench-small.yaml and Switchyard's model (moe/src/model.rs): pre-norm blocks
with RMSNorm (eps 1e-5), rotate-half RoPE (theta 1e4), causal attention over 4 heads,
every layer an MoE of 8 SwiGLU experts (top-2 of a softmax router, weights renormalised),
Switch load-balancing loss (0.01) and router z-loss (0.001), untied LM head, AdamW
(betas 0.9/0.95, eps 1e-8, decay 0.1 on matrices), global-norm clipping at 1.0, linear
warmup. Tokens are random ids below 256 (the byte tokenizer's range), like the synthetic
source: FLOPs do not depend on them.

Expert paths (`--experts`): `loop` sorts the token copies by expert and runs one SwiGLU
per expert (HF Mixtral / torchtitan's for-loop path); `grouped_mm` runs all experts in
`torch._grouped_mm` calls over stacked weights (torchtitan's grouped path), where this
PyTorch build has it on the CPU.
"""

import argparse
import math
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D, HEADS, LAYERS, EXPERTS, TOP_K, FFN = 4096, 256, 4, 4, 8, 2, 512
BATCH, SEQ = 8, 256
INIT_STD, EPS, THETA = 0.02, 1e-5, 10_000.0
LB_COEF, Z_COEF = 0.01, 0.001
LR, WARMUP, BETAS, ADAM_EPS, DECAY, CLIP = 1e-3, 10, (0.9, 0.95), 1e-8, 0.1, 1.0


def normal(*shape, std=INIT_STD):
    return nn.Parameter(torch.randn(*shape) * std)


def rope_tables(seq, head_dim):
    half = head_dim // 2
    freq = THETA ** (-(2.0 * torch.arange(half, dtype=torch.float64)) / head_dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq[None, :]
    return angle.cos().float(), angle.sin().float()


def rotate(x, cos, sin):
    """x: [B, H, S, Dh], pairing dim i with i + Dh/2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        out_std = INIT_STD / math.sqrt(2 * LAYERS)
        self.wq, self.wk, self.wv = normal(D, D), normal(D, D), normal(D, D)
        self.wo = normal(D, D, std=out_std)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        heads = lambda w: (x @ w).view(b, s, HEADS, D // HEADS).transpose(1, 2)
        q, k, v = rotate(heads(self.wq), cos, sin), rotate(heads(self.wk), cos, sin), heads(self.wv)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, s, D) @ self.wo


class Moe(nn.Module):
    def __init__(self, experts_path):
        super().__init__()
        self.path = experts_path
        self.w_router = normal(D, EXPERTS)
        # Stacked like torchtitan's GroupedExperts: [E, D, F], [E, D, F], [E, F, D].
        self.w_gate, self.w_up = normal(EXPERTS, D, FFN), normal(EXPERTS, D, FFN)
        self.w_down = normal(EXPERTS, FFN, D)

    def forward(self, x):
        b, s, _ = x.shape
        x = x.reshape(b * s, D)
        logits = x.float() @ self.w_router
        probs = logits.softmax(-1)
        weights, experts = probs.topk(TOP_K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        # Token copies sorted by expert.
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=EXPERTS)
        token = order // TOP_K
        rows = x[token]
        if self.path == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            g = torch._grouped_mm(rows, self.w_gate, offs=offs)
            u = torch._grouped_mm(rows, self.w_up, offs=offs)
            out = torch._grouped_mm(F.silu(g) * u, self.w_down, offs=offs)
        else:
            outs = []
            for e, chunk in enumerate(rows.split(counts.tolist())):
                if chunk.shape[0]:
                    a = F.silu(chunk @ self.w_gate[e]) * (chunk @ self.w_up[e])
                    outs.append(a @ self.w_down[e])
            out = torch.cat(outs)
        out = out * weights.flatten()[order, None]
        y = torch.zeros_like(x).index_add_(0, token, out)
        # Switch load balancing: E * sum_e f_e P_e; ST-MoE z-loss: mean logsumexp^2.
        fraction = counts.float() / flat.numel()
        load_balance = EXPERTS * (fraction * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, -1).pow(2).mean()
        return y.view(b, s, D), LB_COEF * load_balance + Z_COEF * z_loss


class Block(nn.Module):
    def __init__(self, experts_path):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(D, eps=EPS), nn.RMSNorm(D, eps=EPS)
        self.attn, self.moe = Attention(), Moe(experts_path)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, aux = self.moe(self.ffn_norm(x))
        return x + y, aux


class Model(nn.Module):
    def __init__(self, experts_path):
        super().__init__()
        self.embed = normal(VOCAB, D)
        self.blocks = nn.ModuleList(Block(experts_path) for _ in range(LAYERS))
        self.final_norm = nn.RMSNorm(D, eps=EPS)
        self.lm_head = normal(D, VOCAB, std=INIT_STD / math.sqrt(2 * LAYERS))
        cos, sin = rope_tables(SEQ, D // HEADS)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, tokens, targets):
        x = self.embed[tokens]
        aux = 0.0
        for block in self.blocks:
            x, block_aux = block(x, self.cos, self.sin)
            aux = aux + block_aux
        logits = self.final_norm(x) @ self.lm_head
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))
        return loss, loss + aux


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--experts", choices=["loop", "grouped_mm"], default="loop")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model(args.experts)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=ADAM_EPS,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    forward = torch.compile(model) if args.compile else model
    generator = torch.Generator().manual_seed(1)

    def step():
        data = torch.randint(0, 256, (BATCH, SEQ + 1), generator=generator)
        loss, total = forward(data[:, :-1], data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        schedule.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(args.steps):
        loss = step()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    tokens = args.steps * BATCH * SEQ
    # The labels of `switchyard bench`, so that scripts/bench-alternate.sh reads both.
    print(f"torch {torch.__version__}, experts={args.experts}{', compiled' if args.compile else ''}")
    print(f"{'threads':<29}{torch.get_num_threads()}")
    print(f"{'step time (mean)':<29}{wall / args.steps:.3f} s")
    print(f"{'tokens/s':<29}{tokens / wall:.0f}")
    print(f"{'CPU time per step':<29}{cpu / args.steps:.3f} s (all threads)")
    print(f"{'last train loss':<29}{loss:.4f}")

if __name__ == "__main__":
    main()
