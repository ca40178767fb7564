"""Everything the stages of one run share: recipe, output dir, device, model, plan, runtime, monitor."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed as dist
from ..attention import attach_sparsity
from ..errors import UserError
from ..models import load_model
from ..parallel import apply_kv_head_permutation, balanced_kv_head_permutation, validate_sequence_parallel
from ..parallel.head_balance import retrieval_per_rank
from ..parallel.head_padding import kv_heads_to_add, pad_kv_heads
from ..parallel.sp_loader import SequenceParallelLoader, shard_eval_batches
from ..parallel.ulysses import enable_sequence_parallel, route_dense_teacher
from ..plan import HeadLayout, SparsityPlan, query_stride_for
from ..trainer import checkpoint as ckpt
from ..trainer.monitor import Monitor

PLAN_SETTINGS = ("window", "retrieval_window", "sink_tokens", "block_size", "indexer_dim", "top_p", "top_k", "query_stride",
                 "seqlen_threshold")


NO_PLAN = ("this recipe needs a sparsity plan: add a calibrate stage first, or set sparsity.plan to a plan.json "
           "from an earlier run")


@dataclass
class RunContext:
    recipe: object
    out_dir: Path
    device: torch.device
    monitor: Monitor
    ds_base: dict
    model: object = None
    tokenizer: object = None
    plan: SparsityPlan | None = None
    runtime: object = None
    sp: object = None  # parallel.ulysses.SequenceParallel once a plan is attached with SP > 1
    padded_kv_heads: int = 0  # zero KV heads appended to ctx.model's layers (parallel/head_padding.py)
    extra: dict = field(default_factory=dict)

    @property
    def sp_size(self) -> int:
        return self.recipe.parallel.sequence_parallel_size

    @property
    def dp_world(self) -> int:
        """Data-parallel groups (world / SP): what DeepSpeed's batch size counts."""
        return dist.world_size() // self.sp_size

    @property
    def dp_rank(self) -> int:
        return dist.rank() // self.sp_size

    # ---- model -----------------------------------------------------------------------------------
    def ensure_model(self) -> None:
        if self.model is None:
            if self.sp_size > 1:  # before any weight is loaded
                from ..cli.dry_run import model_config_only
                validate_sequence_parallel(self.recipe, model_config_only(self.recipe.model), dist.world_size())
            self.monitor.info(f"loading model {self.recipe.model.name_or_path}")
            self.model, self.tokenizer = load_model(self.recipe.model, device=self.device)

    def load_teacher(self):
        """A frozen dense copy of the original model (memory: one more copy of the weights). Under SP it
        runs on the same token shards, so its attention goes through Ulysses too."""
        teacher, _ = load_model(self.recipe.model, device=self.device)
        if self.device.type == "cuda":
            teacher = teacher.to(torch.bfloat16)
        teacher.eval().requires_grad_(False)
        if self.plan.padded_kv_heads:  # the same head layout as the student
            from ..attention import attention_modules
            pad_kv_heads(attention_modules(teacher), teacher.config, self.plan.padded_kv_heads, self.plan.model.group,
                         self.plan.model.head_dim)
        route_dense_teacher(teacher, self.plan, self.sp, self.recipe.sparsity.backend)
        return teacher

    def plan_settings(self) -> dict:
        s = self.recipe.sparsity
        settings = {k: getattr(s, k) for k in PLAN_SETTINGS}
        if settings["query_stride"] == "auto":
            lengths = [st.seq_len for st in self.recipe.stages if hasattr(st, "seq_len")]
            settings["query_stride"] = query_stride_for(max(lengths, default=0))
        if settings["retrieval_window"] == "auto":
            settings["retrieval_window"] = settings["window"]
        return settings

    def use_plan(self, plan: SparsityPlan) -> None:
        """Adopt `plan` (recipe settings win over the file's), save DIR/plan.json, attach the sparse attention."""
        self.ensure_model()
        plan = plan.model_copy(update=self.plan_settings())
        plan = SparsityPlan.model_validate(plan.model_dump())
        plan = self._pad_heads(plan)
        try:
            plan.check_model(self.model.config)
        except ValueError as err:
            raise UserError(str(err)) from None
        plan = self._balance_heads(plan)
        if dist.is_main():
            plan.save(self.out_dir / "plan.json")
        self.plan = plan
        if plan.kv_head_permutation is not None:
            from ..attention import attention_modules
            apply_kv_head_permutation(attention_modules(self.model), plan.kv_head_permutation, plan.model.group,
                                      plan.model.head_dim)
        self._attach()
        self.monitor.info(plan.summary())

    def _pad_heads(self, plan: SparsityPlan) -> SparsityPlan:
        """With parallel.pad_heads and an SP size the heads do not allow: append zero KV heads to the plan
        and the model. A plan saved by an earlier launch of the run already says how many."""
        extra = plan.padded_kv_heads
        if not extra and self.sp_size > 1 and self.recipe.parallel.pad_heads:
            extra = kv_heads_to_add(plan.model.num_q_heads, plan.model.num_kv_heads, self.sp_size)
            if extra:
                plan = plan.with_padding(extra)
                self.monitor.info(f"sequence parallel {self.sp_size}: {extra} zero KV head(s) appended per layer "
                                  f"-> {plan.model.num_q_heads} query / {plan.model.num_kv_heads} KV heads "
                                  "(exact; export removes them)")
        if extra != self.padded_kv_heads:
            from ..attention import attention_modules
            pad_kv_heads(attention_modules(self.model), self.model.config, extra - self.padded_kv_heads,
                         plan.model.group, plan.model.head_dim)
            self.padded_kv_heads = extra
        return plan

    def _balance_heads(self, plan: SparsityPlan) -> SparsityPlan:
        """Under SP, permute KV heads so each rank holds the same number of retrieval heads. A plan that
        already carries a permutation keeps it: checkpoints and final weights are stored in its order."""
        if self.sp_size > 1 and plan.kv_head_permutation is None:
            perm = balanced_kv_head_permutation(plan, self.sp_size)
            if perm is not None:
                plan = plan.model_copy(update={"kv_head_permutation": perm})
        if self.sp_size > 1:
            counts = retrieval_per_rank(plan, plan.kv_head_permutation, self.sp_size)
            self.monitor.info(f"sequence parallel {self.sp_size}: retrieval KV heads per SP rank, per layer: {counts}")
        return plan

    def _attach(self) -> None:
        """The sparse attention on ctx.model; under SP also the Ulysses set-up, which the training loop
        switches on (`parallel.ulysses.sequence_parallel_active`)."""
        self.runtime = attach_sparsity(self.model, self.plan, backend=self.recipe.sparsity.backend,
                                       seed=self.recipe.seed)
        if self.sp_size > 1:
            micro = next(s.micro_batch_size for s in self.recipe.stages if s.type in ("indexer_warmup", "sparse_train"))
            self.sp = enable_sequence_parallel(self.model, self.sp_size, micro)

    def ensure_plan(self) -> None:
        if self.plan is not None:
            return
        saved = self.out_dir / "plan.json"
        source = self.recipe.sparsity.plan or (str(saved) if saved.is_file() else None)
        if source is None:
            raise UserError(NO_PLAN)
        try:
            plan = SparsityPlan.load(source)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"sparsity plan {source}: {err}") from None
        self.use_plan(plan)

    def layout(self) -> HeadLayout:
        self.ensure_model()
        return HeadLayout.from_config(self.model.config)

    # ---- data ------------------------------------------------------------------------------------
    def _loader_shard(self) -> tuple[int, int]:
        """(rank, ranks) the loaders shard by: data-parallel groups without SP; under SP every rank
        reads its own batches and Ulysses' adapter has the SP group work through them in turn."""
        return (dist.rank(), dist.world_size()) if self.sp is not None else (self.dp_rank, self.dp_world)

    def train_loader(self, stage, name: str):
        from ..data import build_train_loader
        rank, world = self._loader_shard()
        loader = build_train_loader(self.recipe.data, self.tokenizer, seq_len=stage.seq_len,
                                    micro_batch_size=stage.micro_batch_size, seed=self.recipe.seed + _stage_index(name),
                                    dp_rank=rank, dp_world=world, cache_dir=self.cache_dir(),
                                    show_progress=dist.is_main())
        return SequenceParallelLoader(loader, self.sp, self.device) if self.sp is not None else loader

    def eval_batches(self, stage, name: str) -> list[dict]:
        from .eval_batches import build_eval_batches
        rank, world = self._loader_shard()
        batches = build_eval_batches(self.recipe.data, self.tokenizer, seq_len=stage.seq_len,
                                     micro_batch_size=stage.micro_batch_size, num_batches=stage.eval_batches,
                                     dp_rank=rank, dp_world=world)
        if self.sp is not None:
            batches = shard_eval_batches(batches, self.sp, self.device, stage.micro_batch_size)
        return [{k: v.to(self.device) for k, v in b.items()} for b in batches]

    def cache_dir(self) -> Path:
        return Path(self.recipe.data.cache_dir) if self.recipe.data.cache_dir else self.out_dir / "cache"

    # ---- between stages --------------------------------------------------------------------------
    def finish_stage_model(self, engine, stage, stage_dir: Path) -> None:
        """Save the stage's final weights; merge LoRA so the next stage and export see a plain model."""
        module = engine.module
        if getattr(stage, "lora", None) is not None:
            module = module.merge_and_unload()
            state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
            ckpt.save_module_state(state if dist.is_main() else None, stage_dir)
        else:
            ckpt.save_final(engine, stage_dir)
        zero3 = engine.zero_optimization_stage() == 3
        engine.destroy()
        self.model = module
        if zero3:  # ZeRO-3 left the parameters partitioned: start the next stage from the saved weights
            self.model = None
            self.ensure_model()
            self._attach()  # weights still in original order: load_final brings the (permuted) ones
            self.load_final(stage_dir)

    def load_final(self, stage_dir: Path) -> None:
        path = ckpt.final_weights(stage_dir)
        if path is None:
            raise UserError(f"{stage_dir} has no final weights (the stage is marked complete but its weights are missing)")
        ckpt.load_final(self.model, path)
        self.monitor.info(f"loaded weights from {path}")


def _stage_index(name: str) -> int:
    return int(name.split("-", 1)[0])
