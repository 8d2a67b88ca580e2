"""Distribution: the launcher's intent (what ``accelerate launch`` or ``torchrun`` put in the
environment) turned into an Accelerator that does exactly that or stops; FSDP2 sharding on CPU
processes (torch's ``fully_shard`` over gloo, which accelerate does not drive off the GPU); and the
save points of a sharded run (a full Hugging Face folder from rank 0, sharded checkpoints).

The loop (train.py) owns when to save; checkpoint.py owns the unsharded checkpoint format."""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType as DT
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from preftune import checkpoint as ckpt
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")


class _NoAcceleratorGuess(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" banner: accelerate imports DeepSpeed whenever it is
    installed to unwrap a model, so every run printed it, with or without DeepSpeed (``describe`` says
    which engine a run used)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_NoAcceleratorGuess())

TYPES = ("NO", "DDP", "FSDP", "DEEPSPEED")
"""What a run is asked to be and reports it was: one process, data parallel, sharded, DeepSpeed ZeRO."""

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_SINGLE = ("`accelerate launch --cpu --num_processes N` starts ONE process (accelerate's single-process "
           "launcher; N only reaches mpirun with --mpirun_hostfile). For N CPU processes use "
           "`accelerate launch --multi_gpu --num_processes N` (or --config_file configs/accelerate/ddp.yaml, "
           "gloo on the CPU) or `torchrun --nproc_per_node N`; for one process, drop --num_processes")


def _flag(env, name: str) -> bool:
    return env.get(name, "false").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Intent:
    """What the launcher asked for: ``type`` (one of :data:`TYPES`), the world size, the mixed
    precision (None when not launched by accelerate), FSDP's version, and whether ``--cpu`` was given."""

    type: str
    world_size: int
    mixed_precision: str | None
    fsdp_version: int
    cpu: bool
    single_launcher_many: bool  # `--cpu --num_processes N`: N asked, one process started


def launcher_intent(env=None) -> Intent:
    """Read the launcher's intent from the environment accelerate launch / torchrun set."""
    env = os.environ if env is None else env
    world = next((int(env[v]) for v in _WORLD_VARS if env.get(v)), 1)
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        kind = "DEEPSPEED"
    elif _flag(env, "ACCELERATE_USE_FSDP"):
        kind = "FSDP"
    else:
        kind = "DDP" if world > 1 else "NO"
    cpu = _flag(env, "ACCELERATE_USE_CPU")
    # accelerate's simple launcher sets MASTER_ADDR only when asked for more than one process
    many = cpu and world == 1 and "MASTER_ADDR" in env and "LOCAL_RANK" not in env and "RANK" not in env
    return Intent(kind, world, env.get("ACCELERATE_MIXED_PRECISION"), int(env.get("FSDP_VERSION", "2")), cpu, many)


def mixed_precision_for(precision: str, launcher: str | None) -> str:
    """accelerate's ``mixed_precision`` for the config's ``precision``, checked against the launcher's.

    The launcher's ``no`` (its default) defers to the config; ``bf16`` needs ``precision: bf16-mixed``
    or ``bf16``; anything else stops the run rather than training in another precision."""
    wanted = "bf16" if precision == "bf16-mixed" else "no"
    if launcher in (None, "no") or (launcher == "bf16" and precision in ("bf16-mixed", "bf16")):
        return wanted
    if launcher == "bf16":
        raise PreftuneError(f"the launcher asks for mixed_precision bf16 but the config's precision is {precision}: "
                            "set precision=bf16-mixed, or launch with --mixed_precision no")
    raise PreftuneError(f"the launcher asks for mixed_precision {launcher}, which preftune does not train in "
                        "(precision: fp32, bf16 or bf16-mixed): launch with --mixed_precision bf16 or no")


def make_accelerator(precision: str, grad_accum: int):
    """An Accelerator that is what the launcher asked for on this machine, or a PreftuneError.

    On the CPU: DDP is accelerate's MULTI_CPU (gloo); FSDP (version 2) is accelerate's MULTI_CPU
    process group with the model sharded here by torch's ``fully_shard`` (see :func:`prepare`);
    DeepSpeed runs on its CPU accelerator over gloo. On a GPU accelerate drives all three itself."""
    intent = launcher_intent()
    if intent.single_launcher_many:
        raise PreftuneError(_SINGLE)
    mixed = mixed_precision_for(precision, intent.mixed_precision)
    launcher_accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "")
    if launcher_accum.isdigit() and int(launcher_accum) != grad_accum:
        raise PreftuneError(f"the launcher sets gradient_accumulation_steps {launcher_accum} but the stage's grad_accum "
                            f"is {grad_accum}: drop it from the accelerate config (preftune's grad_accum sets it)")
    cuda = torch.cuda.is_available() and not intent.cpu
    kwargs: dict = {"gradient_accumulation_steps": grad_accum, "mixed_precision": mixed, "cpu": not cuda}
    cpu_fsdp = None
    if intent.type == "FSDP" and not cuda:
        if intent.fsdp_version != 2:
            raise PreftuneError(f"FSDP version {intent.fsdp_version} does not run on CPU processes here; "
                                "set fsdp_version: 2 in the accelerate config (or --fsdp_version 2)")
        cpu_fsdp = FullyShardedDataParallelPlugin()  # the launcher's FSDP_* settings
        kwargs["fsdp_plugin"] = cpu_fsdp
    if intent.type == "DEEPSPEED" and not cuda:
        # DeepSpeed's CPU accelerator over gloo: accelerate must not take the MULTI_CPU path here
        kwargs |= {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    if intent.world_size == 1:
        # Stages run back to back in one process (pipeline, sweep) may differ in mixed precision;
        # accelerate keeps that in a process-wide singleton, which is only safe to reset undistributed.
        AcceleratorState._reset_state()
    accelerator = Accelerator(**kwargs)
    accelerator.cpu_fsdp = cpu_fsdp
    got = describe(accelerator)
    if got["type"] != intent.type or got["world_size"] != intent.world_size:
        raise PreftuneError(f"the launcher asked for {intent.type} over {intent.world_size} processes but accelerate "
                            f"set up {got['type']} over {got['world_size']} on {got['device']}; stopping rather than "
                            "training as something else")
    return accelerator


def describe(accelerator) -> dict:
    """``run.json``'s ``distributed``: the type, world size, mixed precision and device as used."""
    d = accelerator.distributed_type
    if d == DT.DEEPSPEED:
        kind = "DEEPSPEED"
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        mixed = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "no"
        zero = ds.get("zero_optimization", {})
        extra = {"zero_stage": zero.get("stage"),
                 "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none")}
    else:
        fsdp = d == DT.FSDP or getattr(accelerator, "cpu_fsdp", None) is not None
        kind = "FSDP" if fsdp else "NO" if d == DT.NO else "DDP"
        mixed = accelerator.mixed_precision
        extra = {"fsdp_version": 2, "sharded_by": "accelerate" if d == DT.FSDP else "torch fully_shard"} if fsdp else {}
    return {"type": kind, "world_size": accelerator.num_processes, "mixed_precision": mixed,
            "device": accelerator.device.type, "backend": accelerator.state.backend, **extra}


# ---------------------------------------------------------------- model and optimizer


def _layer_classes(policy, plugin) -> set[str]:
    names = plugin.transformer_cls_names_to_wrap
    if isinstance(names, str):
        names = names.split(",")
    return {n.strip() for n in (names or getattr(policy.causal_lm, "_no_split_modules", None) or [])}


def shard(policy, plugin):
    """FSDP2 over gloo: ``fully_shard`` each decoder layer (the plugin's layer classes, else the
    model's ``_no_split_modules``), then the policy as the root, so that the embedding and the LM head
    the chunked log-probs read are gathered for the policy's one forward."""
    # FSDP2's names (here and in _fsdp2) are public from torch 2.6, newer than the torch>=2.4 floor, and
    # deepspeed is the optional `gpu` extra: these are imported where used, everything else at the top
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    if plugin.auto_wrap_policy is not None and getattr(plugin.auto_wrap_policy, "__name__", "") != "transformer_auto_wrap_policy":
        raise PreftuneError("FSDP on CPU processes wraps by transformer layer only: set "
                            "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP in the accelerate config")
    if plugin.activation_checkpointing:
        raise PreftuneError("fsdp_activation_checkpointing is not applied on CPU processes: set it false in the "
                            "accelerate config and use sft.gradient_checkpointing / dpo.gradient_checkpointing")
    classes = _layer_classes(policy, plugin)
    layers = [m for m in policy.modules() if type(m).__name__ in classes]
    if not layers:
        raise PreftuneError(f"FSDP found no decoder layer of classes {sorted(classes)} to shard; name them in "
                            "fsdp_transformer_layer_cls_to_wrap")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward)
    fully_shard(policy, mesh=mesh)
    return policy


def prepare(accelerator, policy, make_optimizer, batch_size: int, max_grad_norm: float | None):
    """Wrap ``policy`` and build its optimizer as the run's distribution needs.

    ``make_optimizer(params)`` builds the optimizer over the trainable parameters; they are taken
    after sharding, since ``fully_shard`` replaces them. Returns ``(policy, optimizer, params)``."""
    if getattr(accelerator, "cpu_fsdp", None) is not None:
        shard(policy, accelerator.cpu_fsdp)
        params = [p for p in policy.parameters() if p.requires_grad]
        return policy, accelerator.prepare(make_optimizer(params)), params
    if describe(accelerator)["type"] == "DEEPSPEED":
        _configure_deepspeed(accelerator, policy, batch_size, max_grad_norm)
    if accelerator.distributed_type.value == "FSDP" and not hasattr(policy, "_no_split_modules"):
        policy._no_split_modules = getattr(policy.causal_lm, "_no_split_modules", None)  # accelerate's wrap policy
    params = [p for p in policy.parameters() if p.requires_grad]
    policy, optimizer = accelerator.prepare(policy, make_optimizer(params))
    if accelerator.distributed_type.value == "FSDP":
        params = [p for p in policy.parameters() if p.requires_grad]
    return policy, optimizer, params


def _configure_deepspeed(accelerator, policy, batch_size: int, max_grad_norm: float | None) -> None:
    """The stage's micro-batch, accumulation and clipping into the DeepSpeed config (a yaml value that
    disagrees with the preftune config stops the run); under ZeRO-3 the LM head is an external
    parameter of the policy, since the chunked log-probs read its weight outside its own forward."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
            "gradient_clipping": 0.0 if max_grad_norm is None else float(max_grad_norm)}
    # the launcher's values, kept from the first stage: a later stage in this process may differ
    launched = plugin.__dict__.setdefault("preftune_launched", {k: ds.get(k, "auto") for k in want})
    for key, value in want.items():
        have = launched[key]
        if have != "auto" and float(have) != float(value):
            raise PreftuneError(f"the DeepSpeed config sets {key}: {have} but the preftune config asks {value}; "
                                "remove it from the accelerate/DeepSpeed config (preftune's config sets it)")
        ds[key] = value
    ds["train_batch_size"] = batch_size * want["gradient_accumulation_steps"] * accelerator.num_processes
    if ds.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed

        deepspeed.zero.register_external_parameter(policy, policy.causal_lm.get_output_embeddings().weight)


@contextmanager
def whole_weights(accelerator):
    """Load models whole on every rank. Under DeepSpeed ZeRO-3 transformers would partition them at
    load (``zero.Init``), but the reference copy and the precomputed reference run before (or outside)
    the engine; ZeRO-3 partitions the policy when :func:`prepare` builds the engine."""
    plugin = accelerator.state.deepspeed_plugin if describe(accelerator)["type"] == "DEEPSPEED" else None
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _fsdp2(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


# ---------------------------------------------------------------- save points


def _strip(state_dict: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def save_hf(accelerator, policy, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """``final/``, ``best/`` or a snapshot as a plain Hugging Face folder written by rank 0. Every rank
    calls this: a sharded model is first gathered into one full state dict (a collective)."""
    inner = accelerator.unwrap_model(policy).model
    state_dict = None
    if _fsdp2(policy) or _deepspeed(policy):
        if _fsdp2(policy):
            full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            full = accelerator.get_state_dict(policy)
        state_dict = _strip(full) if full is not None else None  # ZeRO-3 gathers onto rank 0 only
    if accelerator.is_main_process:
        ckpt.save_hf(inner, tokenizer, folder, extra, state_dict=state_dict)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, folder: Path, policy, optimizer, state: dict) -> None:
    """A resumable checkpoint. Unsharded runs: checkpoint.py's format, from rank 0. FSDP2: the trainable
    weights and optimizer state as torch distributed-checkpoint shards (``sharded/``, every rank writes
    its own), with ``rng.safetensors``, ``state.json`` and the manifest beside them. DeepSpeed: its own engine checkpoint."""
    folder = Path(folder)
    if not (_fsdp2(policy) or _deepspeed(policy)):
        if accelerator.is_main_process:
            ckpt.save_checkpoint(folder, accelerator.unwrap_model(policy).model, optimizer, state)
        accelerator.wait_for_everyone()
        return
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _deepspeed(policy):
        policy.save_checkpoint(str(tmp), tag="deepspeed")
    else:
        dcp.save(_sharded_state(policy, optimizer), checkpoint_id=str(tmp / "sharded"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.save_rng(tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        ckpt.write_manifest(tmp)  # last: a checkpoint without it is incomplete (checkpoint.latest_complete)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, folder: Path, policy, optimizer) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state. Every rank calls this."""
    folder = Path(folder)
    if _deepspeed(policy):
        policy.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=False)
    elif _fsdp2(policy):
        if not (folder / "sharded").is_dir():
            raise PreftuneError(f"checkpoint {folder} is not sharded (no sharded/): it was written by an unsharded "
                                "run; resume it with the launcher it was written by")
        target = _sharded_state(policy, optimizer)
        dcp.load(target, checkpoint_id=str(folder / "sharded"))
        set_state_dict(policy, _optimizers(optimizer), model_state_dict=target["model"],
                       optim_state_dict=target["optim"], options=StateDictOptions(strict=False))
    else:
        return ckpt.load_checkpoint(folder, accelerator.unwrap_model(policy).model, optimizer)
    ckpt.load_rng(folder / "rng.safetensors")
    return json.loads((folder / "state.json").read_text())


def _optimizers(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def _sharded_state(policy, optimizer) -> dict:
    """This rank's shards of the trainable weights and their optimizer state, keyed by parameter name."""
    model_sd, optim_sd = get_state_dict(policy, _optimizers(optimizer))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in model_sd.items() if k in trainable}, "optim": optim_sd}
