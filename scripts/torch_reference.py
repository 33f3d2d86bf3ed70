#!/usr/bin/env python3
"""PyTorch eager reference of Switchyard's MoE transformer, for `switchyard bench` on a GPU.

Reads the same YAML config (model, data.seq_len, data.batch_size, optim, precision) and
trains the same architecture on random tokens: embedding, pre-norm RMSNorm blocks, rotary
(rotate-half) causal multi-head attention, a top-k softmax MoE layer (fp32 router, Switch
load-balancing loss, router z-loss, weights renormalised over the k choices, dropless,
experts as SwiGLU, tokens grouped by expert with one GEMM per expert) or a dense SwiGLU,
untied or tied LM head, AdamW with global-norm clipping. `precision: bf16` is autocast to
bf16 with f32 master weights (the router and the losses in f32), as Switchyard's.

Prints tokens/s, achieved TFLOP/s with Switchyard's FLOP count (`forward_flops_per_token`:
matmuls only, attention scores over the full sequence, backward = 2x forward), the bf16
(or fp32) matmul peak measured in the same run, MFU against it, and peak memory.

    python3 scripts/torch_reference.py --config configs/gpu/bench-gpu.yaml --steps 10 --warmup 3
    python3 scripts/torch_reference.py --config configs/bench-small.yaml --device cpu --threads 2 --steps 6 --warmup 2
    python3 scripts/torch_reference.py --config configs/bench-small.yaml --device cpu --threads 2 --compile --experts grouped_mm

On the CPU it also prints the process's CPU time per step; `scripts/bench-alternate.sh` reads
its `tokens/s` and `CPU time per step` lines as it reads `switchyard bench`'s.

Differences from Switchyard that matter for speed, kept on purpose (eager PyTorch is the
reference the issue names): `--attention sdpa` (default) uses
`torch.nn.functional.scaled_dot_product_attention` (flash attention on a GPU); `--attention
math` materialises the scores as Switchyard's burn-op attention does. `--experts loop`
(default) runs one SwiGLU per expert on its rows (HF Mixtral's way); `--experts grouped_mm`
runs all experts in `torch._grouped_mm` calls over their stacked weights (torchtitan's).
`--compile` wraps the model in `torch.compile` (with `loop` it recompiles whenever the
per-expert row counts change, i.e. every step). Only the top-k softmax router is
implemented (the bench presets use it).
"""

import argparse
import math
import resource
import time

import torch
import torch.nn.functional as F
import yaml


def forward_flops_per_token(m, seq_len):
    """Switchyard's `moe::model::forward_flops_per_token`."""
    d, v = m["d_model"], m["vocab_size"]
    moe = m["moe"]
    every = moe.get("every", 1)
    total = 2.0 * d * v
    for layer in range(m["n_layers"]):
        total += 4 * 2.0 * d * d + 2.0 * 2.0 * seq_len * d
        if layer % every == 0:
            total += 2.0 * d * moe["num_experts"]
            total += moe["top_k"] * 3 * 2.0 * d * moe["expert_ffn_dim"]
            shared = moe.get("shared_expert")
            if shared:
                total += shared.get("count", 1) * 3 * 2.0 * d * shared["ffn_dim"]
        else:
            total += 3 * 2.0 * d * m["ffn_dim"]
    return total


class RmsNorm(torch.nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.gamma, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.gamma.to(x.dtype)


def normal(shape, std):
    return torch.nn.Parameter(torch.randn(shape) * std)


class SwiGlu(torch.nn.Module):
    def __init__(self, d, f, std):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = normal((d, f), std), normal((d, f), std), normal((f, d), std)

    def forward(self, x):
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


class Attention(torch.nn.Module):
    def __init__(self, m, std, out_std, attention):
        super().__init__()
        d = m["d_model"]
        self.h = m["n_heads"]
        self.wq, self.wk, self.wv = normal((d, d), std), normal((d, d), std), normal((d, d), std)
        self.wo = normal((d, d), out_std)
        self.theta = m.get("rope_theta", 10000.0)
        self.attention = attention

    def rope(self, x):  # x: [B, H, S, Dh], rotate-half pairing i with i + Dh/2
        s, dh = x.shape[-2], x.shape[-1]
        half = dh // 2
        freq = self.theta ** (-2.0 * torch.arange(half, device=x.device, dtype=torch.float32) / dh)
        angle = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] * freq[None, :]
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    def forward(self, x):
        b, s, d = x.shape
        heads = lambda w: (x @ w).view(b, s, self.h, d // self.h).transpose(1, 2)
        q, k, v = self.rope(heads(self.wq)), self.rope(heads(self.wk)), heads(self.wv)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(d // self.h)
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            probs = scores.masked_fill(mask, float("-inf")).softmax(-1).to(v.dtype)
            out = probs @ v
        return out.transpose(1, 2).reshape(b, s, d) @ self.wo


class MoeLayer(torch.nn.Module):
    def __init__(self, d, moe, std, experts_path):
        super().__init__()
        self.path = experts_path
        self.e, self.k = moe["num_experts"], moe["top_k"]
        router = moe.get("router", {"type": "top_k_softmax"})
        assert router.get("type", "top_k_softmax") == "top_k_softmax", "only top_k_softmax"
        self.normalize = router.get("normalize_weights", True)
        self.w_gate = normal((d, self.e), std)
        self.experts = torch.nn.ModuleList(SwiGlu(d, moe["expert_ffn_dim"], std) for _ in range(self.e))
        shared = moe.get("shared_expert")
        self.shared = (
            torch.nn.ModuleList(SwiGlu(d, shared["ffn_dim"], std) for _ in range(shared.get("count", 1)))
            if shared
            else torch.nn.ModuleList()
        )

    def forward(self, x):
        b, s, d = x.shape
        x_td = x.reshape(b * s, d)
        with torch.autocast(x.device.type, enabled=False):  # fp32 router
            logits = x_td.float() @ self.w_gate.float()
            probs = logits.softmax(-1)
            weights, experts = probs.topk(self.k, -1)
            if self.normalize:
                weights = weights / weights.sum(-1, keepdim=True)
            counts = torch.bincount(experts.flatten(), minlength=self.e).float()
            f = counts / (b * s * self.k)
            lb = self.e * (f * probs.mean(0)).sum()
            z = torch.logsumexp(logits, -1).pow(2).mean()
        flat = experts.flatten()
        order = flat.argsort()
        rows = x_td[order // self.k]
        if self.path == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            stack = lambda name: torch.stack([getattr(e, name) for e in self.experts]).to(rows.dtype)
            g = torch._grouped_mm(rows, stack("w_gate"), offs=offs)
            u = torch._grouped_mm(rows, stack("w_up"), offs=offs)
            out = torch._grouped_mm(F.silu(g) * u, stack("w_down"), offs=offs)
        else:
            out = torch.empty_like(rows)
            offset = 0
            for e, n in enumerate(counts.long().tolist()):
                if n:
                    out[offset : offset + n] = self.experts[e](rows[offset : offset + n])
                offset += n
        y = torch.zeros_like(x_td)
        y.index_add_(0, order // self.k, out * weights.flatten()[order, None].to(out.dtype))
        for shared in self.shared:
            y = y + shared(x_td)
        return y.view(b, s, d), lb, z


class Transformer(torch.nn.Module):
    def __init__(self, m, attention, experts_path):
        super().__init__()
        std = m.get("init_std", 0.02)
        out_std = std / math.sqrt(2 * m["n_layers"])
        d, eps, moe = m["d_model"], m.get("norm_eps", 1e-5), m["moe"]
        self.embed = normal((m["vocab_size"], d), std)
        self.blocks = torch.nn.ModuleList()
        for layer in range(m["n_layers"]):
            block = torch.nn.Module()
            block.attn_norm, block.ffn_norm = RmsNorm(d, eps), RmsNorm(d, eps)
            block.attn = Attention(m, std, out_std, attention)
            is_moe = layer % moe.get("every", 1) == 0
            block.ffn = MoeLayer(d, moe, std, experts_path) if is_moe else SwiGlu(d, m["ffn_dim"], std)
            self.blocks.append(block)
        self.final_norm = RmsNorm(d, eps)
        tied = m.get("tie_embeddings", True)
        self.lm_head = None if tied else normal((d, m["vocab_size"]), out_std)

    def forward(self, tokens):
        x = self.embed[tokens]
        lb = z = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x = x + block.attn(block.attn_norm(x))
            h = block.ffn_norm(x)
            if isinstance(block.ffn, MoeLayer):
                y, l, zz = block.ffn(h)
                lb, z = lb + l, z + zz
            else:
                b, s, d = h.shape
                y = block.ffn(h.reshape(b * s, d)).view(b, s, d)
            x = x + y
        head = self.embed.t() if self.lm_head is None else self.lm_head
        return self.final_norm(x) @ head, lb, z


def matmul_peak_tflops(device, dtype, n, repeats=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for r in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        if r:
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: the config's")
    p.add_argument("--attention", choices=["sdpa", "math"], default="sdpa")
    p.add_argument("--seq-len", type=int, help="override data.seq_len")
    p.add_argument("--experts", choices=["loop", "grouped_mm"], default="loop")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(open(args.config))
    m, data, optim = cfg["model"], cfg["data"], cfg["optim"]
    seq = args.seq_len or data["seq_len"]
    batch = data["batch_size"]
    precision = args.precision or cfg.get("precision", "fp32")
    device = torch.device(args.device)
    torch.manual_seed(cfg.get("run", {}).get("seed", 0))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in Switchyard
    model = Transformer(m, args.attention, args.experts).to(device)
    forward = torch.compile(model) if args.compile else model
    params = sum(p.numel() for p in model.parameters())
    no_decay = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    decay = [p for n, p in model.named_parameters() if not n.endswith("gamma")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.get("weight_decay", 0.1)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim["lr"],
        betas=(optim.get("beta1", 0.9), optim.get("beta2", 0.95)),
        eps=optim.get("eps", 1e-8),
    )
    moe = m["moe"]
    lb_coef, z_coef = moe.get("load_balance_coef", 0.01), moe.get("z_loss_coef", 0.001)
    clip = optim.get("grad_clip")
    vocab_used = min(m["vocab_size"], 256)  # byte-level data, as the presets use

    def step():
        tokens = torch.randint(0, vocab_used, (batch, seq + 1), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits, lb, z = forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        total = loss + lb_coef * lb + z_coef * z
        opt.zero_grad(set_to_none=True)
        total.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()  # waits for the device, as Switchyard's step does

    peak = matmul_peak_tflops(device, dtype, 8192 if device.type == "cuda" else 1024)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    tokens_per_s = args.steps * batch * seq / seconds
    flops = 3 * forward_flops_per_token(m, seq)
    achieved = tokens_per_s * flops / 1e12
    print(f"torch {torch.__version__} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
    print(f"precision, attention          {precision}, {args.attention}")
    print(f"experts, compiled, threads    {args.experts}, {args.compile}, {torch.get_num_threads()}")
    print(f"parameters                    {params / 1e9:.3f} B")
    print(f"tokens per step               {batch * seq}")
    print(f"step time (mean)              {seconds / args.steps:.3f} s")
    print(f"tokens/s                      {tokens_per_s:.0f}")
    if device.type == "cpu":
        print(f"CPU time per step             {cpu / args.steps:.3f} s (all threads)")
    print(f"model GFLOP per token (f+b)   {flops / 1e9:.4f}")
    print(f"achieved TFLOP/s              {achieved:.2f}")
    print(f"{precision} matmul peak TFLOP/s    {peak:.1f} (8192^2, measured)" if device.type == "cuda" else f"{precision} matmul peak TFLOP/s    {peak:.3f} (1024^2, measured)")
    print(f"MFU (achieved / matmul peak)  {achieved / peak:.3f}")
    if device.type == "cuda":
        print(f"peak memory                   {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
    print(f"last train loss               {loss:.4f}")


if __name__ == "__main__":
    main()
