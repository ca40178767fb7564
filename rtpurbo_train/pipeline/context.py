"""Everything the stages of one run share: recipe, output dir, device, model, plan, runtime, monitor."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed as dist
from ..attention import attach_sparsity
from ..errors import UserError
from ..models import load_model
from ..plan import HeadLayout, SparsityPlan
from ..trainer import checkpoint as ckpt
from ..trainer.monitor import Monitor

PLAN_SETTINGS = ("window", "sink_tokens", "block_size", "indexer_dim", "top_p", "top_k", "seqlen_threshold")


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
    extra: dict = field(default_factory=dict)

    @property
    def dp_world(self) -> int:
        return dist.world_size() // self.recipe.parallel.sequence_parallel_size

    @property
    def dp_rank(self) -> int:
        return dist.rank() // self.recipe.parallel.sequence_parallel_size

    # ---- model -----------------------------------------------------------------------------------
    def ensure_model(self) -> None:
        if self.model is None:
            self.monitor.info(f"loading model {self.recipe.model.name_or_path}")
            self.model, self.tokenizer = load_model(self.recipe.model, device=self.device)

    def load_teacher(self):
        """A frozen dense copy of the original model (memory: one more copy of the weights)."""
        teacher, _ = load_model(self.recipe.model, device=self.device)
        if self.device.type == "cuda":
            teacher = teacher.to(torch.bfloat16)
        teacher.eval().requires_grad_(False)
        return teacher

    def plan_settings(self) -> dict:
        s = self.recipe.sparsity
        return {k: getattr(s, k) for k in PLAN_SETTINGS}

    def use_plan(self, plan: SparsityPlan) -> None:
        """Adopt `plan` (recipe settings win over the file's), save DIR/plan.json, attach the sparse attention."""
        self.ensure_model()
        plan = plan.model_copy(update=self.plan_settings())
        plan = SparsityPlan.model_validate(plan.model_dump())
        try:
            plan.check_model(self.model.config)
        except ValueError as err:
            raise UserError(str(err)) from None
        if dist.is_main():
            plan.save(self.out_dir / "plan.json")
        self.plan = plan
        self.runtime = attach_sparsity(self.model, plan, backend=self.recipe.sparsity.backend, seed=self.recipe.seed)
        self.monitor.info(plan.summary())

    def ensure_plan(self) -> None:
        if self.plan is not None:
            return
        saved = self.out_dir / "plan.json"
        source = self.recipe.sparsity.plan or (str(saved) if saved.is_file() else None)
        if source is None:
            raise UserError("this recipe needs a sparsity plan: add a calibrate stage first, or set sparsity.plan "
                            "to a plan.json from an earlier run")
        try:
            plan = SparsityPlan.load(source)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"sparsity plan {source}: {err}") from None
        self.use_plan(plan)

    def layout(self) -> HeadLayout:
        self.ensure_model()
        return HeadLayout.from_config(self.model.config)

    # ---- data ------------------------------------------------------------------------------------
    def train_loader(self, stage, name: str):
        from ..data import build_train_loader
        return build_train_loader(self.recipe.data, self.tokenizer, seq_len=stage.seq_len,
                                  micro_batch_size=stage.micro_batch_size, seed=self.recipe.seed + _stage_index(name),
                                  dp_rank=self.dp_rank, dp_world=self.dp_world, cache_dir=self.cache_dir(),
                                  show_progress=dist.is_main())

    def eval_batches(self, stage, name: str) -> list[dict]:
        from .eval_batches import build_eval_batches
        batches = build_eval_batches(self.recipe.data, self.tokenizer, seq_len=stage.seq_len,
                                     micro_batch_size=stage.micro_batch_size, num_batches=stage.eval_batches,
                                     dp_rank=self.dp_rank, dp_world=self.dp_world)
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
            self.runtime = attach_sparsity(self.model, self.plan, backend=self.recipe.sparsity.backend,
                                           seed=self.recipe.seed)
            self.load_final(stage_dir)

    def load_final(self, stage_dir: Path) -> None:
        path = ckpt.final_weights(stage_dir)
        if path is None:
            raise UserError(f"{stage_dir} has no final weights (the stage is marked complete but its weights are missing)")
        ckpt.load_final(self.model, path)
        self.monitor.info(f"loaded weights from {path}")


def _stage_index(name: str) -> int:
    return int(name.split("-", 1)[0])
