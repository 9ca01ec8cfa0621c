"""The one module that imports deepspeed: process group, ZeRO engine, checkpoint files, and the
gather-once context used by generation inside training.

Set DS_ACCELERATOR before importing this module (loretta.train.trainer.select_device does it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from deepspeed.utils import set_z3_leaf_modules

from loretta.comm import all_reduce_, barrier, broadcast_object
from loretta.config import TrainConfig
from loretta.dist import DistInfo
from loretta.dsconfig import offloads_optimizer
from loretta.errors import DependencyError
from loretta.model import Decoder, DecoderConfig
from loretta.model.decoder import Block

__all__ = ["Engine", "all_reduce_", "barrier", "broadcast_object", "build_engine"]

# DeepSpeed's ZeRO-3 calls torch.distributed.all_gather_into_tensor / reduce_scatter_tensor,
# deprecated in torch 2.14; the warning comes back on every step (other code mutating the
# warning filters resets Python's once-per-location registry) and buries the training log.
warnings.filterwarnings(
    "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
)

# Engine._hooks_off edits DeepSpeed's private state (DeepSpeedZeRoOffload.forward_hooks /
# backward_hooks, param.ds_active_sub_modules), which DeepSpeed may
# change in any release. The versions it was tested with, [low, high); pyproject.toml pins the same.
DEEPSPEED_TESTED = ((0, 16), (0, 20))


def check_deepspeed_version(version: str) -> None:
    """Raise DependencyError unless `version` (e.g. '0.19.8') is in the tested range."""
    (lo_major, lo_minor), (hi_major, hi_minor) = DEEPSPEED_TESTED
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        major, minor = -1, -1
    if not (lo_major, lo_minor) <= (major, minor) < (hi_major, hi_minor):
        raise DependencyError(
            f"deepspeed {version} is installed, but loretta's ZeRO-3 generation path "
            f"(Engine.generation) edits DeepSpeed's private module hooks and was tested with "
            f"deepspeed>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}: install a version in that "
            f"range (pip install 'deepspeed>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}'), or "
            "check Engine._hooks_off against the new DeepSpeed and widen DEEPSPEED_TESTED"
        )


def check_async_io() -> None:
    """NVMe offload needs DeepSpeed's async_io op (libaio); say so before DeepSpeed fails deep
    inside deepspeed.initialize with an op-builder message."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise DependencyError(
            "the DeepSpeed config offloads to NVMe (offload_*.device='nvme'), which needs "
            f"DeepSpeed's async_io op, and deepspeed {deepspeed.__version__} cannot build it "
            "here: the libaio headers are missing. Install them (apt install libaio-dev; the op "
            "is compiled on first use), or offload to CPU memory instead: "
            "--engine.deepspeed_config=zero3_offload"
        )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def init_distributed(info: DistInfo, backend: str, timeout_s: float) -> None:
    for k, v in info.env().items():
        os.environ.setdefault(k, v)
    if torch.distributed.is_initialized():
        return
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=timeout_s),
        rank=info.rank,
        world_size=info.world_size,
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: none on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        dim = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        if len(dim) < 2 or "tok_embeddings" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_model(
    mcfg: DecoderConfig,
    ds_config: dict[str, Any],
    seed: int,
    zero_init: bool,
    precision: str,
    init_state: dict[str, torch.Tensor] | None = None,
) -> Decoder:
    """Construct the decoder; with zero_init its parameters are born partitioned, in the
    dtype of `precision` (run.precision, which the DeepSpeed config was resolved from), and each
    is initialised inside a gather (init code in __init__ cannot reach partitioned tensors).

    `init_state` (rank 0's warm-start weights) replaces the random init. It must be applied
    before deepspeed.initialize copies the weights into ZeRO-3's fp32 master partitions: a
    later write to the parameters would be undone by the first optimizer step."""
    if not zero_init:
        model = Decoder(mcfg)
        model.init_weights(seed)
        if init_state is not None:  # deepspeed.initialize broadcasts rank 0's weights
            model.load_state_dict(init_state, strict=True)
        return model
    # No dtype argument: zero.Init then takes the training dtype from the config. An explicit
    # one is ignored where the accelerator lacks fp16 (DeepSpeed 0.19.8 reads `dtype or fp16 if
    # fp16_supported() else bf16 ...` as `(dtype or fp16) if ... else bf16`): on a CPU without
    # oneDNN fp16, an fp32 run got bf16 weights. The check below holds either way.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Decoder(mcfg)
    want = DTYPES[precision]
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != want}
    if wrong:
        name, got = next(iter(wrong.items()))
        raise DependencyError(
            f"deepspeed.zero.Init (deepspeed {deepspeed.__version__}) built {len(wrong)} "
            f"parameters in the wrong dtype, e.g. {name}: {got}, for a {want} run. Train "
            "without engine.zero_init (the default) or use a DeepSpeed version that honours "
            "the config's dtype."
        )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, p in model.named_parameters():
        with GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                if init_state is not None:
                    p.data.copy_(init_state[name].to(p.dtype))
                else:
                    model.init_param(name, p.data, seed)
    return model


class Engine:
    """A thin wrapper so that the training loop never touches DeepSpeed's API directly."""

    def __init__(self, ds_engine: Any, ds_config: dict[str, Any]) -> None:
        self.ds = ds_engine
        self.ds_config = ds_config
        self._last_step: tuple[bool, float] = (True, float("nan"))

    @property
    def module(self) -> Decoder:
        return self.ds.module  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        return torch.device(self.ds.device)

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def set_lr(self, lr: float) -> None:
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> tuple[bool, float]:
        """Optimizer step at the accumulation boundary -> (applied, global grad norm).
        DeepSpeed discards a step whose gradients are not finite (norm reported as inf).
        Between boundaries nothing is read back (the norm may be a device tensor: reading it
        would sync the host every micro-step); the last boundary's result is returned."""
        boundary = self.is_accumulation_boundary()
        self.ds.step()
        if not boundary:
            return self._last_step
        norm = self.ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = (
            not bool(getattr(self.ds.optimizer, "overflow", False))
            and norm == norm
            and norm != float("inf")
        )
        self._last_step = (applied, norm)
        return applied, norm

    def is_accumulation_boundary(self) -> bool:
        return bool(self.ds.is_gradient_accumulation_boundary())

    def save(self, folder: Path, client_state: dict[str, Any] | None = None) -> None:
        self.ds.save_checkpoint(
            str(folder), tag="ds", client_state=client_state or {}, save_latest=False
        )

    def load(self, folder: Path, universal: bool = False) -> dict[str, Any]:
        tag = "universal" if universal else "ds"
        with weights_only_loads():
            path, client = self.ds.load_checkpoint(
                str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}/{tag}")
        return client or {}

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        """Take ZeRO-3's per-module fetch/release hooks off the model for the block.

        Generation runs many small forwards; with hooks on, each one all-gathers every layer
        again (DeepSpeed #4354). We gather explicitly instead, and put the hooks back after.

        The hooks are lifted out of the modules' hook dicts and put back as they were (same
        handles, same order), not re-registered: DeepSpeed (0.19.8 here) invalidates its recorded
        fetch trace when hooks are registered on the root module again, and without a trace
        ZeRO-3 neither prefetches nor coalesces, so every training step after a generation
        fetched each weight alone and re-recorded the trace (a third of a transitive step on
        svl_digits, 2 CPU processes). The trace survives this block (tests/test_zero3.py)."""
        check_deepspeed_version(deepspeed.__version__)  # private API below
        offload = self.ds.optimizer.parameter_offload
        for p in self.module.parameters():
            p.ds_active_sub_modules.clear()  # type: ignore[attr-defined]
        handles = [*offload.forward_hooks, *offload.backward_hooks]
        # every hook dict the handles live in, as it is now (order included), to put back after
        saved: dict[int, tuple[dict[int, Any], list[tuple[int, Any]]]] = {}
        for h in handles:
            for ref in (h.hooks_dict_ref, *h.extra_dict_ref):
                d = ref()
                if d is not None and id(d) not in saved:
                    saved[id(d)] = (d, list(d.items()))
        for h in handles:
            h.remove()
        try:
            yield
        finally:
            for d, items in saved.values():
                d.clear()
                d.update(items)

    @contextlib.contextmanager
    def generation(
        self, mode: str = "once", layers_per_group: int = 4
    ) -> Iterator[Callable[..., torch.Tensor]]:
        """Yield forward(ids, positions, doc_ids, cache=...) for no-grad generation.

        mode 'once': every weight is gathered once for the whole block (fast; needs the full
        model to fit on a device). 'layers': each forward gathers the embeddings, then groups
        of `layers_per_group` layers, then the head, one group at a time (bounded memory;
        every rank must then run the same number of forwards, which the caller guarantees).
        Both are collectives: every rank enters the block together."""
        model = self.module
        if self.zero_stage() != 3:
            yield model
            return
        with self._hooks_off(), _torch_linear():
            if mode == "once":
                with GatheredParameters(list(model.parameters()), modifier_rank=None):
                    # .forward, not __call__: the root module keeps a start-of-forward hook
                    # that runs a collective (a trace check) on every call
                    yield model.forward
            else:
                yield functools.partial(self._grouped_forward, layers_per_group)

    def _grouped_forward(
        self,
        group: int,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        m = self.module
        with GatheredParameters([m.tok_embeddings.weight], modifier_rank=None):
            h, ctx = m.begin(ids, positions, doc_ids, cache)
        for lo in range(0, len(m.layers), group):
            idx = range(lo, min(lo + group, len(m.layers)))
            params = [p for i in idx for p in m.layers[i].parameters()]
            with GatheredParameters(params, modifier_rank=None):
                for i in idx:
                    h = m.run_layer(i, h, ctx)
        head = [m.norm.weight] + (
            [m.tok_embeddings.weight] if m.output is None else [m.output.weight]
        )
        with GatheredParameters(head, modifier_rank=None):
            return m.end(h, ctx)

    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def partition_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of partitioned parameters and of optimizer state."""
        params = 0
        for p in self.module.parameters():
            t = getattr(p, "ds_tensor", None)
            params += (
                (t.numel() * t.element_size()) if t is not None else p.numel() * p.element_size()
            )
        opt = 0
        inner = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        for st in inner.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    opt += v.numel() * v.element_size()
        for g in getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", []) or []:
            opt += g.numel() * g.element_size()  # fp32 master weights
        return {"params": params, "optimizer": opt}


def build_engine(
    cfg: TrainConfig,
    ds_config: dict[str, Any],
    seed: int,
    init_state: dict[str, torch.Tensor] | None = None,
) -> Engine:
    if cfg.objective.links and ds_config.get("zero_optimization", {}).get("stage") == 3:
        check_deepspeed_version(deepspeed.__version__)  # fail before the first generation
    model = build_model(
        cfg.model, ds_config, seed, cfg.engine.zero_init, cfg.run.precision, init_state
    )
    model.activation_checkpointing = cfg.engine.activation_checkpointing
    device = torch.device(deepspeed.get_accelerator().device_name())
    model.set_loss_impl(cfg.model.loss_impl, device)
    compiled = model.compile_blocks(cfg.model.compile, device)
    if compiled and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # each block becomes one ZeRO-3 unit: its weights are gathered by one hook before the
        # compiled body runs, and no hook fires inside the graph (on its submodules)
        set_z3_leaf_modules(model, [Block])
    groups = param_groups(model, cfg.optim.weight_decay)
    if offloads_optimizer(ds_config) or "optimizer" in ds_config:
        optimizer = None  # DeepSpeed builds it from the JSON (CPU Adam for offload)
        model_params: Any = groups
    else:
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.optim.lr,
            betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
            eps=cfg.optim.eps,
        )
        model_params = None
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model_params, config=ds_config
    )
    patched = getattr(torch.nn.functional.linear, "__module__", "").startswith("deepspeed")
    if compiled and patched:  # dsconfig turns memory_efficient_linear off for compiled blocks
        raise RuntimeError(
            "torch.nn.functional.linear is DeepSpeed's ZeRO-3 linear (memory_efficient_linear), "
            "which recompiles every compiled block; set zero_optimization.memory_efficient_linear"
            "=false in the DeepSpeed JSON or model.compile=false"
        )
    return Engine(ds_engine, ds_config)


@contextlib.contextmanager
def _torch_linear() -> Iterator[None]:
    """torch's own F.linear for the block, DeepSpeed's ZeRO-3 linear again after it.

    ZeRO-3 (memory_efficient_linear) swaps F.linear, process-wide, for an autograd Function
    that keeps gathered weights out of the graph. Generation needs no graph, and on a small
    model the Function's per-call cost (argument binding, autocast queries) was 22% of a
    decode step (py-spy, svl_digits on 2 CPU processes). The weights and the matmul are the
    same, so are the logits (tests/test_zero3.py)."""
    patched = torch.nn.functional.linear
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = patched


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside the block every torch.load runs with weights_only=True.

    DeepSpeed reads its checkpoint files with an unrestricted torch.load, which would run
    any callable a pickle names. Here only tensors, containers and DeepSpeed's own plain
    records (the ZeRO stage enum, loss scalers) can be rebuilt; anything else fails to load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    real = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, set, frozenset, slice]
    with torch.serialization.safe_globals(allowed):
        torch.load = load  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.load = real  # type: ignore[assignment]


def _universal_main(argv: list[str]) -> None:
    """`python -m loretta.engine --universal ARGS`: ds_to_universal with weights-only loads."""
    import runpy
    import sys

    sys.argv = ["ds_to_universal", *argv]
    with weights_only_loads():
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")


def convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's universal-checkpoint conversion (for resuming at another world size), its
    loads weights-only (see weights_only_loads)."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "loretta.engine",
        "--universal",
        "--input_folder",
        str(src),
        "--output_folder",
        str(dst),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--no_strict",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"ds_to_universal failed on {src}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["--universal"]:
        sys.exit("usage: python -m loretta.engine --universal DS_TO_UNIVERSAL_ARGS")
    _universal_main(sys.argv[2:])
