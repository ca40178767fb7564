"""GPU benchmark of the indexer kernels: block selection (top-p) and the fused KL loss.

    python benchmarks/bench_indexer.py [--seqlens 8192 32768 65536 131072] [--out benchmarks/results/indexer_h200.md]
    python benchmarks/bench_indexer.py --compile-check   # no GPU needed: sm_90 builds, registers, spills

B = 1, Hq_r = 32, Hkv_r = 8, d = 16, D = 128, bf16. A correctness check against the PyTorch reference
runs first (on the GPU). Times are triton.testing.do_bench medians in milliseconds. The reference is
timed at the first (smallest) T only (it streams T x T scores through memory in chunks and is far slower).
"""
import argparse
import datetime
import importlib.util
import math
import pathlib
import sys

import torch
import triton

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_kernels():
    """`import rtpurbo_kernels`, or load the kernels/ folder under that name (a bare checkout)."""
    try:
        import rtpurbo_kernels
        return rtpurbo_kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "rtpurbo_kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["rtpurbo_kernels"] = module
        spec.loader.exec_module(module)
        return module


rk = load_kernels()
from rtpurbo_kernels.indexer_select import block_mass_reference  # noqa: E402
from rtpurbo_kernels.indexer_select.block_mass_triton import block_mass_triton  # noqa: E402
from rtpurbo_kernels.layout import block_index_from_mask  # noqa: E402
from rtpurbo_kernels.indexer_select import block_mass_triton as mass_module  # noqa: E402
from rtpurbo_kernels.indexer_kl import kl_triton as kl_module  # noqa: E402

HQ, HKV, D_INDEX, D_HEAD, BS = 32, 8, 16, 128, 64
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1) only smoke-tests this script


def make_inputs(T, dtype=torch.bfloat16, B=1, hq=HQ, hkv=HKV, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, T, hq, D_HEAD, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(B, T, hkv, D_HEAD, device=DEVICE, dtype=dtype, generator=gen)
    qi = (2 * torch.randn(B, T, hq, D_INDEX, device=DEVICE, generator=gen)).to(dtype)
    ki = torch.randn(B, T, hkv, D_INDEX, device=DEVICE, dtype=dtype, generator=gen)
    return q, k, qi.requires_grad_(), ki.requires_grad_()


def density_selection(B, hkv, T, density, seed=0):
    """A synthetic selection with about `density` of the causal blocks: sink, own and previous block,
    plus random blocks (random data would make top-p 0.9 nearly dense, which says nothing)."""
    nqb = math.ceil(T / BS)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    score = torch.rand(B, hkv, nqb, nqb, device=DEVICE, generator=gen)
    qb = torch.arange(nqb, device=DEVICE)[:, None]
    kb = torch.arange(nqb, device=DEVICE)[None, :]
    keep = (score < density) | (kb == 0) | (kb >= qb - 1)
    return block_index_from_mask(keep & (kb <= qb))


def correctness(log, seqlens):
    """Triton vs reference on the GPU; returns True when everything agrees."""
    ok = True
    cases = [(seqlens[0], torch.float32, 8, 2), (seqlens[0], torch.bfloat16, 8, 2)] + [(T, torch.bfloat16, HQ, HKV) for T in seqlens[1:]]
    for T, dtype, hq, hkv in cases:
        q, k, qi, ki = make_inputs(T, dtype, hq=hq, hkv=hkv, seed=T)
        m_ref = block_mass_reference(qi.detach(), ki.detach())
        m_tri = block_mass_triton(qi.detach(), ki.detach(), out=torch.full_like(m_ref, float("nan")))
        causal = torch.ones(m_ref.shape[-1], m_ref.shape[-1], device=DEVICE, dtype=torch.bool).tril()
        mass_err = (m_ref - m_tri)[..., causal].abs().max().item()
        sel_ref = rk.indexer_block_select(qi.detach(), ki.detach(), backend="reference")
        sel_tri = rk.indexer_block_select(qi.detach(), ki.detach(), backend="triton")
        sel_agree = (sel_ref[1] == sel_tri[1]).float().mean().item()
        sparse = density_selection(1, hkv, T, 0.3, seed=1)
        errs = []
        for sel in (None, sparse):
            kw = dict(sm_scale=D_HEAD ** -0.5)
            if sel is not None:
                kw.update(block_idx=sel[0], block_cnt=sel[1])
            out = {}
            for backend in ("reference", "triton"):
                qi.grad = ki.grad = None
                loss = rk.indexer_kl_loss(q, k, qi, ki, backend=backend, **kw)
                loss.backward()
                out[backend] = (loss.detach().float(), qi.grad.float(), ki.grad.float())
            r, t = out["reference"], out["triton"]
            errs.append(((r[0] - t[0]).abs().item() / r[0].abs().item(),
                         ((r[1] - t[1]).abs().max() / r[1].abs().max()).item(),
                         ((r[2] - t[2]).abs().max() / r[2].abs().max()).item()))
        tol_mass = 1e-5 if dtype == torch.float32 else 1e-4
        tol_grad = 1e-4 if dtype == torch.float32 else 3e-2
        case_ok = (mass_err < tol_mass and sel_agree > 0.99
                   and all(e[0] < 1e-4 and e[1] < tol_grad and e[2] < tol_grad for e in errs))
        ok &= case_ok
        log(f"check T={T} {str(dtype)[6:]} Hq={hq} Hkv={hkv}: mass max err {mass_err:.2e}, block counts agree "
            f"{100 * sel_agree:.2f}% of rows, KL dense rel err loss/dqi/dki "
            f"{errs[0][0]:.1e}/{errs[0][1]:.1e}/{errs[0][2]:.1e}, KL sparse {errs[1][0]:.1e}/{errs[1][1]:.1e}/"
            f"{errs[1][2]:.1e} -> {'OK' if case_ok else 'FAIL'}")
    return ok


def bench(fn, heavy=False):
    # Long ops: few repetitions (device time is scarce); short ones: do_bench's defaults.
    return triton.testing.do_bench(fn, warmup=5 if heavy else 25, rep=30 if heavy else 100,
                                   return_mode="median")


def compile_check():
    """Build every kernel variant for sm_90 with Triton's bundled ptxas (no GPU needed) and print shared
    memory, registers and stack (spills) under the LAUNCH settings; exit status 1 on any failure."""
    import os
    import re
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    ints = ["stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_qib", "stride_qit",
            "stride_qih", "stride_kib", "stride_kit", "stride_kih", "MAXB", "MAXQ", "T", "HQ", "G", "HKV", "D", "DI"]
    ok = True
    for dt in ("bf16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        types = dict(Q="*" + dt, K="*" + dt, QI="*" + dt, KI="*" + dt, LSE="*fp32", MASS="*fp32", BIDX="*i32",
                     BCNT="*i32", QIDX="*i32", QCNT="*i32", KL="*fp32", LSE_F="*fp32", LSE_I="*fp32", DQ="*fp32",
                     DK="*fp32", scale2="fp32", sm_scale2="fp32", **{n: "i32" for n in ints})
        base = dict(BLOCK=BS, DOT_PRECISION=prec, UPCAST=False)
        kl = dict(base, BLOCK_D=D_HEAD, BLOCK_DI=D_INDEX, SCORE_PRECISION=prec)
        variants = [(mass_module.indexer_row_lse_kernel, mass_module.LAUNCH["row_lse"], dict(base, BLOCK_D=D_INDEX))]
        variants += [(mass_module.indexer_block_mass_kernel, mass_module.LAUNCH["block_mass"],
                      dict(base, BLOCK_D=D_INDEX, G=g)) for g in (1, 4, 8)]
        variants += [(kl_module.indexer_kl_fwd_kernel, kl_module.LAUNCH["fwd"], dict(kl, SPARSE=sp, NEED_DQ=dq))
                     for sp in (False, True) for dq in (False, True)]
        variants += [(kl_module.indexer_kl_bwd_dk_kernel, kl_module.LAUNCH["bwd_dk"], dict(kl, SPARSE=sp))
                     for sp in (False, True)]
        for fn, launch, consts in variants:
            sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
            label = f"{fn.__name__} {dt} " + " ".join(f"{k}={v}" for k, v in consts.items() if k in ("G", "SPARSE", "NEED_DQ"))
            try:
                compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                          options=launch)
            except Exception as e:  # report every variant, then fail
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}")
                ok = False
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
            fits = compiled.metadata.shared <= 227 * 1024
            ok &= fits
            print(f"{'ok ' if fits else 'OOR'} {label} {launch}: shared {compiled.metadata.shared} B, registers "
                  f"{regs.group(1) if regs else '?'}, stack {stack.group(1) if stack else '?'} B")
    print("sm_90 compile check:", "all OK" if ok else "FAILED")
    return ok


SWEEP_CONFIGS = [dict(num_warps=w, num_stages=st) for w, st in ((4, 2), (4, 3), (8, 2), (8, 3))]


def sweep(T, log):
    """Time each kernel under each launch setting at one T; keep the fastest (printed, and used below)."""
    q, k, qi, ki = make_inputs(T)
    qi, ki = qi.detach(), ki.detach()
    scale = D_INDEX ** -0.5
    _, lse_f, lse_i, _ = kl_module.kl_forward_triton(q, k, qi, ki, sm_scale=D_HEAD ** -0.5, scale=scale, block_idx=None,
                                                     block_cnt=None, block_size=BS, need_dq=True)
    ops = {
        (mass_module, "row_lse"): lambda: block_mass_triton(qi, ki),
        (mass_module, "block_mass"): lambda: block_mass_triton(qi, ki),
        (kl_module, "fwd"): lambda: kl_module.kl_forward_triton(
            q, k, qi, ki, sm_scale=D_HEAD ** -0.5, scale=scale, block_idx=None, block_cnt=None, block_size=BS,
            need_dq=True),
        (kl_module, "bwd_dk"): lambda: kl_module.kl_backward_dk_triton(
            q, k, qi, ki, lse_f, lse_i, sm_scale=D_HEAD ** -0.5, scale=scale, query_lists=None, block_size=BS),
    }
    log(f"launch sweep at T={T // 1024}K, dense (ms; masses = both selection kernels, one varied):")
    log("")
    log("| kernel | " + " | ".join(f"w{c['num_warps']} s{c['num_stages']}" for c in SWEEP_CONFIGS) + " | kept |")
    log("| --- |" + " --- |" * (len(SWEEP_CONFIGS) + 1))
    for (module, name), fn in ops.items():
        times = []
        for cfg in SWEEP_CONFIGS:
            module.LAUNCH[name] = cfg
            times.append(bench(fn, heavy=True))
        best = SWEEP_CONFIGS[min(range(len(times)), key=times.__getitem__)]
        module.LAUNCH[name] = best
        log(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {best} |")
    log("")


def kl_fwd_bwd(q, k, qi, ki, backend, **kw):
    def run():
        qi.grad = ki.grad = None
        rk.indexer_kl_loss(q, k, qi, ki, sm_scale=D_HEAD ** -0.5, backend=backend, **kw).backward()
    return run


def kl_fwd(q, k, qi, ki, backend, **kw):
    def run():
        with torch.no_grad():
            rk.indexer_kl_loss(q, k, qi, ki, sm_scale=D_HEAD ** -0.5, backend=backend, **kw)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--density", type=float, default=0.1, help="block density of the sparse-KL selection")
    ap.add_argument("--check-seqlens", type=int, nargs="+", default=[1000, 8192])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile-check", action="store_true", help="only build the kernels for sm_90 (no GPU)")
    ap.add_argument("--sweep", type=int, default=0, help="T of a launch-setting sweep run first (0: none)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "indexer_h200.md"))
    args = ap.parse_args()
    if args.compile_check:
        sys.exit(0 if compile_check() else 1)
    global DEVICE
    DEVICE = args.device
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(s=""):
        # Rewritten on every line, so a run stopped at its time limit still leaves what it measured.
        print(s, flush=True)
        lines.append(s)
        out.write_text("\n".join(lines) + "\n")

    log(f"# Indexer kernels on {torch.cuda.get_device_name() if DEVICE == 'cuda' else DEVICE}")
    log("")
    log(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}, "
        f"triton {triton.__version__}; command `python {' '.join(sys.argv)}`")
    log(f"B=1, Hq_r={HQ}, Hkv_r={HKV}, d={D_INDEX}, D={D_HEAD}, bf16, block 64; do_bench medians in ms.")
    log("")
    log("## Correctness on the GPU (Triton vs PyTorch reference)")
    log("")
    ok = correctness(log, args.check_seqlens)
    log("")
    log(f"correctness: {'all OK' if ok else 'FAILED'}")
    log("")
    log("## Times (ms)")
    log("")
    if args.sweep:
        sweep(args.sweep, log)
    log(f"launch settings: selection {mass_module.LAUNCH}, KL {kl_module.LAUNCH}")
    log("")
    log("| T | select top-p 0.9 | of which masses | KL fwd dense | KL fwd+bwd dense | "
        f"KL fwd {args.density:.0%} blocks | KL fwd+bwd {args.density:.0%} blocks | select + sparse KL fwd+bwd |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ref_rows = []
    for T in args.seqlens:
        q, k, qi, ki = make_inputs(T)
        heavy = T >= 32768
        qid, kid = qi.detach(), ki.detach()
        t_sel = bench(lambda: rk.indexer_block_select(qid, kid, top_p=0.9, backend="triton"), heavy)
        t_mass = bench(lambda: block_mass_triton(qid, kid), heavy)
        sel = density_selection(1, HKV, T, args.density)
        sp = dict(block_idx=sel[0], block_cnt=sel[1])
        t_fd = bench(kl_fwd(q, k, qi, ki, "triton"), heavy)
        t_fbd = bench(kl_fwd_bwd(q, k, qi, ki, "triton"), heavy)
        t_fs = bench(kl_fwd(q, k, qi, ki, "triton", **sp), heavy)
        t_fbs = bench(kl_fwd_bwd(q, k, qi, ki, "triton", **sp), heavy)
        log(f"| {T // 1024}K | {t_sel:.2f} | {t_mass:.2f} | {t_fd:.2f} | {t_fbd:.2f} | {t_fs:.2f} | {t_fbs:.2f} | "
            f"{t_sel + t_fbs:.2f} |")
        if T == args.seqlens[0]:
            r_sel = bench(lambda: rk.indexer_block_select(qid, kid, top_p=0.9, backend="reference"), True)
            r_fd = bench(kl_fwd(q, k, qi, ki, "reference"), True)
            r_fbd = bench(kl_fwd_bwd(q, k, qi, ki, "reference"), True)
            ref_rows.append((T, r_sel, r_fd, r_fbd, t_sel, t_fd, t_fbd))
        del q, k, qi, ki, qid, kid, sel, sp
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    log("")
    log("## PyTorch reference on the same GPU (chunked, memory-bounded)")
    log("")
    log("| T | select ref | KL fwd ref | KL fwd+bwd ref | speed-up select / fwd / fwd+bwd |")
    log("| --- | --- | --- | --- | --- |")
    for T, r_sel, r_fd, r_fbd, t_sel, t_fd, t_fbd in ref_rows:
        log(f"| {T // 1024}K | {r_sel:.2f} | {r_fd:.2f} | {r_fbd:.2f} | "
            f"{r_sel / t_sel:.1f}x / {r_fd / t_fd:.1f}x / {r_fbd / t_fbd:.1f}x |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
