"""What the indexer costs next to the sparse attention it feeds: one attention layer on one GPU.

    python benchmarks/bench_selection.py --lengths 65536 131072 --out benchmarks/results/selection_h200.md

The layer: B=1, 32 query / 8 KV heads (G=4), head dim 128, bf16, block 64. 15% retrieval heads, rounded up:
2 of the 8 KV heads (8 query heads) carry a 16-dim indexer; the other 6 are streaming heads (window 8192,
sink 4). The attention is timed on the layer's merged block index: streaming rows for 6 heads, and for the
2 retrieval heads the sink + local blocks plus random causal blocks up to `--density` (10%) of the causal
blocks, the density the kernel benchmarks use (random indexer inputs select near-dense and would flatter
the ratio). Rows:
- selection: `indexer_block_select` with query stride 1 (the exact token-level oracle) and 4 / 8 / 16, and
  its top-p step alone on the stride-8 masses, torch rule vs the one-launch Triton rows (same run);
- indexer KL forward+backward: all causal blocks or the selected ones, every query block or every S-th;
- attention: the block-sparse kernel forward and forward+backward, and dense SDPA, on the same inputs;
- the issue-14 ratios: selection (stride 8) + KL (fwd+bwd, the sparse stage's cheapest exact-enough
  setting) over the sparse attention fwd+bwd, and selection over the sparse forward.
Times: `triton.testing.do_bench` medians (ms). A correctness check of the strided selection and the strided
KL against their PyTorch references runs first.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from result_file import emit, provenance

HQ, HKV, D, DI, BS = 32, 8, 128, 16, 64
G = HQ // HKV
RET_KV = 2  # ceil(0.15 * 8)
WINDOW, SINK = 8192, 4
DEV = "cuda"  # a CPU smoke run sets "cpu" (the kernels then run their PyTorch references)


def bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=40, return_mode="median")


def inputs(T: int, seed=0):
    dev = DEV
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(1, T, HQ, D, device=dev, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, T, HKV, D, device=dev, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, T, HKV, D, device=dev, generator=gen, dtype=torch.bfloat16)
    qi = (2.0 * torch.randn(1, T, RET_KV * G, DI, device=dev, generator=gen)).bfloat16()
    ki = torch.randn(1, T, RET_KV, DI, device=dev, generator=gen).bfloat16()
    return q, k, v, qi, ki


def retrieval_blocks(T: int, density: float, seed=1):
    """idx/cnt [1, RET_KV, NQB, *]: sink + own + previous block and random causal blocks up to `density`."""
    from rtpurbo_kernels.layout import block_index_from_mask, sync_free_width
    dev = DEV
    nqb = math.ceil(T / BS)
    gen = torch.Generator(device=dev).manual_seed(seed)
    qb = torch.arange(nqb, device=dev)[:, None]
    kb = torch.arange(nqb, device=dev)[None, :]
    causal = kb <= qb
    pick = torch.rand(1, RET_KV, nqb, nqb, device=dev, generator=gen) < density
    mask = (pick | (kb == 0) | (kb >= qb - 1)) & causal
    return block_index_from_mask(mask, width=sync_free_width(nqb))


def mask_rows(block_idx, block_cnt):
    from rtpurbo_kernels.indexer_select import mask_from_block_index
    return mask_from_block_index(block_idx, block_cnt, block_idx.shape[2])


def top_p_steps(qi, ki):
    """The top-p step two ways on the same stride-8 masses: (torch rule, one-launch Triton rows), each a
    zero-argument call returning (block_idx, block_cnt)."""
    from rtpurbo_kernels.indexer_select import select_blocks_from_mass, selection_width
    from rtpurbo_kernels.indexer_select.block_mass_triton import block_mass_triton
    from rtpurbo_kernels.indexer_select.select_triton import select_blocks_triton
    mass = block_mass_triton(qi, ki, query_stride=8)
    width = selection_width(mass.shape[-1], None, 1, 2)
    return (lambda: select_blocks_from_mass(mass, top_p=0.9),
            lambda: select_blocks_triton(mass, top_p=0.9, width=width))


def check() -> list[str]:
    """Strided selection masses and strided KL (loss, grads) against the PyTorch references."""
    import rtpurbo_kernels as rk
    from rtpurbo_kernels.indexer_select import block_mass_reference
    from rtpurbo_kernels.indexer_select.block_mass_triton import block_mass_triton
    lines, dev = [], DEV
    for T, dtype in ((4133, torch.float32), (4133, torch.bfloat16)):
        gen = torch.Generator(device=dev).manual_seed(T)
        qi = (2 * torch.randn(1, T, 8, DI, device=dev, generator=gen)).to(dtype)
        ki = torch.randn(1, T, 2, DI, device=dev, generator=gen).to(dtype)
        for S in (4, 8):
            ref = block_mass_reference(qi, ki, query_stride=S)
            got = block_mass_triton(qi, ki, query_stride=S, out=torch.full_like(ref, float("nan")))
            causal = torch.ones(ref.shape[-1], ref.shape[-1], dtype=torch.bool, device=dev).tril()
            err = (got - ref)[..., causal].abs().max().item()
            nan = bool(got[..., causal].isnan().any())
            lines.append(f"- selection masses T={T} {str(dtype)[6:]} S={S}: max abs err {err:.2e}, NaN {nan} -> "
                         f"{'OK' if err < 1e-5 and not nan else 'FAIL'}")
        torch_rule, triton_rows = top_p_steps(qi, ki)
        want, got = torch_rule(), triton_rows()
        same = torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        rows = (mask_rows(*got) != mask_rows(*want)).any(-1).float().mean().item()
        lines.append(f"- top-p step T={T} {str(dtype)[6:]}: Triton rows vs torch rule identical {same}, rows that "
                     f"differ {rows:.1e} (only candidates at the top-p cut may) -> {'OK' if rows < 1e-2 else 'FAIL'}")
        q = torch.randn(1, T, 8, D, device=dev, generator=gen).to(dtype)
        k = torch.randn(1, T, 2, D, device=dev, generator=gen).to(dtype)
        for S in (1, 8):
            out = {}
            for backend in ("reference", "triton"):
                a, b = qi.detach().float().to(dtype).requires_grad_(), ki.detach().float().to(dtype).requires_grad_()
                loss = rk.indexer_kl_loss(q, k, a, b, sm_scale=D ** -0.5, query_block_stride=S, backend=backend)
                loss.backward()
                out[backend] = (loss.detach().float(), a.grad.float(), b.grad.float())
            rel = [((x - y).norm() / y.norm().clamp(min=1e-30)).item() for x, y in zip(out["triton"], out["reference"])]
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            lines.append(f"- KL T={T} {str(dtype)[6:]} stride {S}: rel err loss/dqi/dki "
                         + "/".join(f"{r:.1e}" for r in rel) + f" -> {'OK' if max(rel) < tol else 'FAIL'}")
    return lines


def measure(T: int, density: float) -> dict:
    import rtpurbo_kernels as rk
    from rtpurbo_kernels.block_sparse_attn.layout import merge_head_blocks, streaming_block_index
    q, k, v, qi, ki = inputs(T)
    r = {}
    for S in (1, 4, 8, 16):
        r[f"select S={S}"] = bench(lambda: rk.indexer_block_select(qi, ki, top_p=0.9, query_stride=S))
    # The top-p step alone on the stride-8 masses, the two ways in the same run: the torch rule (what every
    # selection ran before select_rows_kernel) and the one-launch Triton rows (what `select S=` runs now).
    torch_rule, triton_rows = top_p_steps(qi, ki)
    r["top-p step, torch"] = bench(torch_rule)
    r["top-p step, Triton rows"] = bench(triton_rows)
    sel = retrieval_blocks(T, density)
    q_ret, k_ret = q[:, :, : RET_KV * G], k[:, :, :RET_KV]
    kl_stride = max(1, T // 8192)  # the recipes' `kl_query_block_stride: auto`
    for name, sel_kw, stride in (("KL all blocks, stride 1", {}, 1), ("KL all blocks, stride auto", {}, kl_stride),
                                 ("KL selected, stride 1", "sel", 1), ("KL selected, stride auto", "sel", kl_stride)):
        kw = {"block_idx": sel[0], "block_cnt": sel[1]} if sel_kw else {}
        a, b = qi.detach().requires_grad_(), ki.detach().requires_grad_()

        def kl_step():
            rk.indexer_kl_loss(q_ret, k_ret, a, b, sm_scale=D ** -0.5, query_block_stride=stride, **kw).backward()
        r[name] = bench(kl_step)
    stream = streaming_block_index(T, WINDOW, SINK, BS, q.device)
    heads = torch.arange(RET_KV, device=q.device)
    idx, cnt = merge_head_blocks(stream, sel, heads, 1, HKV)
    kv_window = torch.full((HKV,), WINDOW, dtype=torch.int32, device=q.device)
    kv_window[:RET_KV] = 0
    r["layer density"] = float(cnt.float().sum() / (HKV * (idx.shape[2] * (idx.shape[2] + 1) / 2)))
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    attn = lambda: rk.block_sparse_attention(qg, kg, vg, idx, cnt, kv_window=kv_window, sink_tokens=SINK,  # noqa: E731
                                             block_size=BS)[0]
    r["sparse attention fwd"] = bench(attn)
    r["sparse attention fwd+bwd"] = bench(lambda: attn().sum().backward())
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    dense = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731
    r["dense SDPA fwd"] = bench(dense)
    r["dense SDPA fwd+bwd"] = bench(lambda: dense().sum().backward())
    r["kl_stride"] = kl_stride
    return r


def render(rows: dict, lengths: list[int], density: float, checks: list[str], argv) -> list[str]:
    names = [k for k in rows[lengths[0]] if k not in ("layer density", "kl_stride")]
    cols = " | ".join(f"{T // 1024}K" for T in lengths)
    lines = ["# Selection and indexer KL next to the sparse attention of one layer", "",
             *provenance("bench_selection.py", argv),
             f"- layer: B=1, {HQ} query / {HKV} KV heads, D {D}, bf16, block {BS}; {RET_KV} retrieval KV heads "
             f"(ceil(15%)), indexer dim {DI}; streaming window {WINDOW}, sink {SINK}; retrieval heads attend to "
             f"{density:.0%} random causal blocks + sink + 2 local; `do_bench` medians in ms; KL stride auto = "
             "T // 8192 (the recipes' `kl_query_block_stride: auto`)", "",
             "## Correctness on the GPU (Triton vs the PyTorch reference)", "", *checks, "",
             "## Times (ms)", "", f"| | {cols} |", "| --- | " + " | ".join("---" for _ in lengths) + " |"]
    lines += [f"| {n} | " + " | ".join(f"{rows[T][n]:.3f}" for T in lengths) + " |" for n in names]
    lines += ["| KL stride auto | " + " | ".join(f"{int(rows[T]['kl_stride'])}" for T in lengths) + " |",
              "| layer block density | " + " | ".join(f"{rows[T]['layer density']:.3f}" for T in lengths) + " |",
              "", "## Ratios", "", f"| | {cols} |", "| --- | " + " | ".join("---" for _ in lengths) + " |"]

    def ratio_row(label, num, den):
        return f"| {label} | " + " | ".join(f"{num(rows[T]) / rows[T][den]:.1%}" for T in lengths) + " |"
    for s in (1, 4, 8, 16):
        lines.append(ratio_row(f"selection S={s} + KL selected (stride auto) fwd+bwd / sparse attention fwd+bwd",
                               lambda r, s=s: r[f"select S={s}"] + r["KL selected, stride auto"], "sparse attention fwd+bwd"))
    lines.append(ratio_row("selection S=1 + KL selected stride 1 fwd+bwd / sparse attention fwd+bwd (before)",
                           lambda r: r["select S=1"] + r["KL selected, stride 1"], "sparse attention fwd+bwd"))
    for s in (1, 4, 8, 16):
        lines.append(ratio_row(f"selection S={s} / sparse attention fwd", lambda r, s=s: r[f"select S={s}"],
                               "sparse attention fwd"))
    lines.append(ratio_row("sparse attention fwd+bwd / dense SDPA fwd+bwd", lambda r: r["sparse attention fwd+bwd"],
                           "dense SDPA fwd+bwd"))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    p.add_argument("--density", type=float, default=0.10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    checks = check()
    print("\n".join(checks), flush=True)
    rows = {}
    for T in args.lengths:
        rows[T] = measure(T, args.density)
        print(f"T={T}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[T].items()), flush=True)
        torch.cuda.empty_cache()
    emit(render(rows, args.lengths, args.density, checks, argv), args.out)


if __name__ == "__main__":
    main()
