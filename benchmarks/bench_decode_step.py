"""One layer's decode attention: the sparse decode kernels vs dense SDPA over the same cache, on one GPU.

    python benchmarks/bench_decode_step.py --contexts 32768 131072 --batches 1 8 --out decode_step.md

Qwen2-1.5B layer shape: 2 KV heads x 6 query heads, head dim 128, blocks of 64; a layer with one retrieval
KV head (indexer dim 16, top-p 0.9 over a peaked random indexer) and one streaming head (sink 4 + window
8192). Rows: dense `scaled_dot_product_attention` of the 6 query heads of each KV head over the whole cache
(what a dense model's decode step runs per layer); the sparse step = `decode_block_select` + `decode_attention`
over the chosen blocks (retrieval head) + `decode_attention` over the ring buffer (streaming head). Each op is
checked against its PyTorch reference first. Timed with triton.testing.do_bench_cudagraph (each op replayed
from a CUDA graph, as the exported model's decode step runs: GPU time without launch overhead).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from result_file import emit, provenance


def err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def main(argv=None):
    from triton.testing import do_bench_cudagraph as do_bench

    from rtpurbo_kernels.sparse_decode import (decode_attention, decode_attention_reference, decode_block_select,
                                               decode_block_select_reference)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bs, G, D, d, dev, dt = 64, 6, 128, 16, "cuda", torch.bfloat16
    lines = ["# One layer's decode attention: sparse decode kernels vs dense SDPA (Qwen2-1.5B layer shape)", "",
             *provenance("bench_decode_step.py", argv),
             f"- 2 KV heads x {G} query heads, head dim {D}, block {bs}; sparse layer = 1 retrieval KV head (indexer "
             f"dim {d}, top-p {args.top_p}) + 1 streaming KV head (sink 4 + window {args.window}); bf16; "
             "do_bench_cudagraph medians; selection and attention checked against the PyTorch references first", "",
             "| context | batch | dense SDPA, 2 KV heads (us) | select (us) | retrieval attn (us) | streaming attn (us) "
             "| sparse total (us) | dense / sparse | blocks chosen | max err select / attn |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    gen = torch.Generator(dev).manual_seed(0)
    for C in args.contexts:
        for B in args.batches:
            k = torch.randn(B, 2, C, D, device=dev, dtype=dt, generator=gen)
            v = torch.randn(B, 2, C, D, device=dev, dtype=dt, generator=gen)
            q = torch.randn(B, 2, G, D, device=dev, dtype=dt, generator=gen)
            # A peaked indexer: 1 key in 256 aligned with the query heads' shared direction carries the mass.
            qi = torch.randn(B, 1, 1, d, device=dev, generator=gen).expand(B, 1, G, d).contiguous()
            ik = torch.randn(B, 1, C, d, device=dev, generator=gen)
            hot = torch.rand(B, 1, C, 1, device=dev, generator=gen) < 1 / 256
            ik = torch.where(hot, qi[:, :, :1] * 3.0, ik)
            # the first row of the last block: its selection averages itself alone (no carry needed)
            pos = torch.full((B,), C - bs, device=dev, dtype=torch.long)
            carry = torch.zeros(B, 1, C // bs, device=dev)
            ring = 4 + args.window
            qr, kr, vr = (x[:, :1].contiguous() for x in (q, k, v))  # the retrieval head's own buffers
            qs, ks, vs = q[:, 1:].contiguous(), k[:, 1:, :ring].contiguous(), v[:, 1:, :ring].contiguous()
            kw = dict(block_size=bs, top_p=args.top_p, sink_blocks=1, local_blocks=2, scale=d ** -0.5)

            chosen, _ = decode_block_select(qi, ik, pos, carry, **kw)
            ref_chosen, _ = decode_block_select_reference(qi, ik, pos, carry, **kw)
            sel_err = (chosen != ref_chosen).float().mean().item()
            out = decode_attention(qr, kr, vr, pos + 1, chosen, block_size=bs)
            att_err = err(out, decode_attention_reference(qr, kr, vr, pos + 1, chosen, block_size=bs))
            lengths = torch.clamp(pos + 1, max=ring)

            qd = q.reshape(B, 2 * G, 1, D)  # the plain model's decode: 12 query heads, GQA in SDPA
            dense = do_bench(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True))
            select = do_bench(lambda: decode_block_select(qi, ik, pos, carry, **kw))
            retrieval = do_bench(lambda: decode_attention(qr, kr, vr, pos + 1, chosen, block_size=bs))
            stream = do_bench(lambda: decode_attention(qs, ks, vs, lengths, None, block_size=bs))
            total = select + retrieval + stream
            frac = chosen.float().sum(-1).mean().item() / (C // bs)
            lines.append(f"| {C} | {B} | {dense * 1e3:.1f} | {select * 1e3:.1f} | {retrieval * 1e3:.1f} | "
                         f"{stream * 1e3:.1f} | {total * 1e3:.1f} | {dense / total:.2f}x | {frac:.1%} | "
                         f"{sel_err:.1e} / {att_err:.1e} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
