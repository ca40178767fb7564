"""GPU integration checks (not timed): the sparse model on the Triton backend agrees with the
PyTorch reference backend, and sparse == full when everything is selected.

    python benchmarks/gpu_checks.py
"""
import torch

from rtpurbo_train.attention import attach_sparsity
from rtpurbo_train.models import ModelConfig, load_model
from rtpurbo_train.plan import HeadLayout, SparsityPlan


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    torch.manual_seed(0)
    for family in ("tiny-llama", "tiny-qwen3"):
        for dtype in (torch.float32, torch.bfloat16):
            model, _ = load_model(ModelConfig(name_or_path=family, overrides={"num_attention_heads": 8, "hidden_size": 512,
                                                                               "num_key_value_heads": 2}), device="cuda")
            model = model.to(dtype)
            layout = HeadLayout.from_config(model.config)
            ids = torch.randint(0, model.config.vocab_size, (2, 1000), device="cuda")
            for window, top_p in ((2048, 1.0), (200, 0.7)):
                plan = SparsityPlan.uniform(layout, [1], window=window, top_p=top_p)
                rt = attach_sparsity(model, plan, backend="triton")
                rt.layers  # noqa: B018
                out = {}
                for backend in ("triton", "reference"):
                    rt.backend = backend
                    model.zero_grad(set_to_none=True)
                    with rt.use_mode("sparse"):
                        logits = model(input_ids=ids, use_cache=False).logits
                    logits.float().square().mean().backward()
                    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
                    out[backend] = (logits.detach(), grad)
                with torch.no_grad(), rt.use_mode("full"):
                    full = model(input_ids=ids, use_cache=False).logits
                print(f"{family} {str(dtype):15s} window {window:5d} top_p {top_p}: "
                      f"triton vs reference logits {rel(out['triton'][0], out['reference'][0]):.2e}, "
                      f"grad {rel(out['triton'][1], out['reference'][1]):.2e}; "
                      f"sparse vs full {rel(out['triton'][0], full):.2e}", flush=True)
                for t in out.values():
                    assert torch.isfinite(t[0]).all() and torch.isfinite(t[1]).all()


if __name__ == "__main__":
    main()
