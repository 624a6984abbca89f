"""A run's checkpoint (`RUN/checkpoint-STEP`) as safetensors and JSON only, and the check that refuses anything
else before any of it is read.

accelerate's `save_state`/`load_state` keep the schedule and the RNG states in pickles that `load_state`
unpickles in full, so a checkpoint from elsewhere could run code on `--resume`. A prefpipe checkpoint holds
these files, written by :func:`save_state`, and nothing else:

    trainer_state.json                 step and counters, processes, sharding (written last: marks it complete)
    pytorch_lora_weights.safetensors   LoRA runs: the adapters, in the export format (trainer/export.py)
    model.safetensors                  --full runs: the UNet's state dict
    model-R-of-N.safetensors           --full runs sharded by FSDP2: process R's rows of every weight
    optimizer.json                     param groups (hyper-parameters, lr), per-weight counters (`step`), names
    optimizer.safetensors              the optimizer's tensors (AdamW's moments), or optimizer-R-of-N.safetensors
    scheduler.json                     the lr schedule's counters (diffusers' LambdaLR: numbers; lambdas rebuilt)
    scaler.json                        the fp16 gradient scaler's numbers, when the run has one
    rng-R.safetensors, rng-R.json      process R's torch CPU (and CUDA) generator states; numpy's and python's

:func:`check_files` refuses any other entry (a `.pkl`, `.bin`, `.pt`, a folder, a link) by name; loading reads
safetensors and JSON only, and checks names, shapes and value types against the run it loads into.

Sharded runs (FSDP2): every process writes its rows of each weight and AdamW moment (`trainer/shards.py`).
Nothing is gathered, and a resume reads its rows from whichever files hold them: a checkpoint loads into any
number of processes, as the torch.distributed.checkpoint folders did (whose `.metadata` is a pickle).
"""

from __future__ import annotations

import json
import random
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import write_atomic
from trainer.shards import TensorFiles, is_dtensor, local_rows, save_tensors

TRAIN_STATE = "trainer_state.json"
FILES = re.compile(r"(trainer_state|optimizer|scheduler|scaler)\.json|pytorch_lora_weights\.safetensors"
                   r"|(model|optimizer)(-\d+-of-\d+)?\.safetensors|rng-\d+\.(safetensors|json)")
DTYPES = {name: getattr(torch, name) for name in
          ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}


@dataclass
class Trainables:
    """What a checkpoint saves and a resume loads into: the prepared UNet (LoRA runs: its adapters only),
    its optimizer and lr schedule."""

    unet: Any
    optimizer: Any
    lr_scheduler: Any
    family: str
    full: bool
    sharded: bool


def check_files(folder: Path) -> None:
    """Refuse a checkpoint holding anything but the files above, naming it, before anything is read."""
    bad = [p.name + ("/" if p.is_dir() else "") for p in sorted(folder.iterdir())
           if p.is_symlink() or not p.is_file() or not FILES.fullmatch(p.name)]
    if bad:
        raise PrefpipeError(
            f"--resume {folder}: refused, it holds {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: a prefpipe "
            "checkpoint is safetensors and JSON files only (listed in trainer/checkpoints.py), and nothing else is "
            "loaded (a pickle runs code when loaded). Checkpoints of an older prefpipe (accelerate's save_state, "
            "pickles) cannot be resumed: start a new run (a LoRA checkpoint's adapters load with --init-from)"
        )


# ---- saving ---------------------------------------------------------------------------------------------


def save_state(folder: Path, t: Trainables, accelerator) -> None:
    """Every process writes its part into `folder`: the main process the weights (sharded: every process its
    shards), the optimizer, the schedule and the scaler; every process its RNG states."""
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    folder.mkdir(parents=True, exist_ok=True)  # by every process (the main one emptied it first)
    model = accelerator.unwrap_model(t.unet)
    with torch.no_grad():
        if not t.full:
            if main:
                from trainer import export

                export.save_lora(model, folder, t.family)
        elif t.sharded:
            save_tensors(folder / f"model-{rank}-of-{world}.safetensors", *local_rows(model.state_dict(), main))
        elif main:
            save_tensors(folder / "model.safetensors", model.state_dict())
        structure, tensors = optimizer_state(t.optimizer, model)
        if t.sharded:
            save_tensors(folder / f"optimizer-{rank}-of-{world}.safetensors", *local_rows(tensors, main))
        elif main:
            save_tensors(folder / "optimizer.safetensors", tensors)
    if main:
        write_json(folder / "optimizer.json", structure)
        write_json(folder / "scheduler.json",
                   {k: v for k, v in t.lr_scheduler.state_dict().items() if k != "lr_lambdas"})
        if accelerator.scaler is not None:
            write_json(folder / "scaler.json", accelerator.scaler.state_dict())
    save_rng(folder, rank, accelerator.device)


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data))


def param_names(optimizer, model) -> list[str]:
    """The name of every parameter of `optimizer`, in the order its state_dict numbers them."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [by_id.get(id(p), f"param.{i}") for i, p in enumerate(params)]


def optimizer_state(optimizer, model) -> tuple[dict, dict[str, torch.Tensor]]:
    """The optimizer's state_dict split into JSON (param groups, python numbers, 0-d tensors such as AdamW's
    `step` as {"scalar", "dtype"}, references {"tensor": key}) and the tensors, keyed `PARAM_NAME.KEY`."""
    saved = optimizer.state_dict()
    names = param_names(optimizer, model)
    state, tensors = {}, {}
    for pid, entries in saved["state"].items():
        record = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() == 0 and not is_dtensor(value):
                record[key] = {"scalar": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
            elif isinstance(value, torch.Tensor):
                tensors[f"{names[pid]}.{key}"] = value
                record[key] = {"tensor": f"{names[pid]}.{key}"}
            elif value is None or isinstance(value, (bool, int, float)):
                record[key] = value
            else:
                raise TypeError(f"optimizer state {key!r} ({type(value).__name__}) has no checkpoint format")
        state[names[pid]] = record
    return {"params": names, "param_groups": saved["param_groups"], "state": state}, tensors


def save_rng(folder: Path, rank: int, device) -> None:
    import numpy as np
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if getattr(device, "type", None) == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    write_json(folder / f"rng-{rank}.json", {"python": [version, list(state), gauss],
                                             "numpy": [name, keys.tolist(), pos, has_gauss, cached]})


# ---- loading ----------------------------------------------------------------------------------------------


def read_json(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        raise PrefpipeError(f"--resume {folder}: incomplete checkpoint: no {name}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PrefpipeError(f"--resume: {path} is not valid JSON ({e})") from e


def load_state(folder: Path, t: Trainables, accelerator) -> None:
    """Load what :func:`save_state` wrote into the run's trainables: weights, optimizer, schedule, scaler, and
    this process's RNG states (the caller checked the folder with :func:`check_files`)."""
    model = accelerator.unwrap_model(t.unet)
    with ExitStack() as stack:
        if t.full:
            load_model(model, TensorFiles(folder, "model", stack))
        else:
            from trainer import export

            export.load_lora(model, folder, t.family)
        load_optimizer(t.optimizer, model, read_json(folder, "optimizer.json"), TensorFiles(folder, "optimizer", stack))
    load_numbers(t.lr_scheduler, folder / "scheduler.json", rebuilt="lr_lambdas")  # diffusers' LambdaLR
    if accelerator.scaler is not None and (folder / "scaler.json").exists():
        load_numbers(accelerator.scaler, folder / "scaler.json")
    load_rng(folder, accelerator.process_index, accelerator.device)


def load_model(model, files: TensorFiles) -> None:
    """Copy the saved weights into `model` in place (its own shards when it is sharded); names must match."""
    expected = set(model.state_dict())
    if files.names() != expected:
        missing, unexpected = sorted(expected - files.names()), sorted(files.names() - expected)
        raise PrefpipeError(f"--resume {files.folder}: its weights are not this UNet's (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for name in sorted(expected):
            target = targets[name]
            (target.to_local() if is_dtensor(target) else target).copy_(files.like(name, target))


def plain_numbers(value) -> bool:
    """JSON numbers, booleans, None, and lists of them (what schedules and scalers hold)."""
    if isinstance(value, list):
        return all(plain_numbers(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def load_optimizer(optimizer, model, saved: dict, files: TensorFiles) -> None:
    """Rebuild the optimizer's state_dict from optimizer.json and its tensors (sharded moments as DTensors
    shaped like their parameter) and load it; the parameter names and group layout must be this run's."""
    names = param_names(optimizer, model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    now = optimizer.state_dict()["param_groups"]
    where = f"--resume: {files.folder / 'optimizer.json'}"
    try:
        if saved["params"] != names:
            raise PrefpipeError(f"{where}: the optimizer of other parameters than this run's")
        groups = []
        for group, old in zip(now, saved["param_groups"], strict=True):
            if old["params"] != group["params"] or not all(plain_numbers(v) for v in old.values()):
                raise PrefpipeError(f"{where}: its param groups are not this run's")
            groups.append({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in old.items()})
        state = {}
        for name, record in saved["state"].items():
            pid = names.index(name)
            state[pid] = {str(key): optimizer_value(value, params[pid], files) for key, value in record.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PrefpipeError(f"{where}: not what prefpipe writes ({type(e).__name__}: {e})") from e
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def optimizer_value(value, param, files: TensorFiles):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict) and set(value) == {"scalar", "dtype"} and value["dtype"] in DTYPES:
        if not isinstance(value["scalar"], (bool, int, float)):
            raise ValueError(f"scalar {value['scalar']!r}")
        return torch.tensor(value["scalar"], dtype=DTYPES[value["dtype"]])
    if isinstance(value, dict) and set(value) == {"tensor"} and isinstance(value["tensor"], str):
        name = value["tensor"]
        if not files.sharded(name):
            return files.whole(name)
        if not is_dtensor(param):
            raise ValueError(f"{name} is sharded, its parameter is not")
        from torch.distributed.tensor import DTensor

        local = files.like(name, param).to(param.to_local().device)
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    raise ValueError(f"unexpected value {value!r}")


def load_numbers(obj, path: Path, rebuilt: str | None = None) -> None:
    """An lr schedule's or a scaler's state (numbers, as its state_dict holds them; `rebuilt`: a key the rebuilt
    object keeps its own of, such as LambdaLR's lambdas) into `obj`."""
    saved, now = read_json(path.parent, path.name), obj.state_dict()
    keep = {rebuilt: [None] * len(now[rebuilt])} if rebuilt in now else {}
    if (not isinstance(saved, dict) or not set(saved) <= set(now) - set(keep)
            or not all(plain_numbers(v) for v in saved.values())):
        raise PrefpipeError(f"--resume: {path} is not this run's (numbers for {sorted(set(now) - set(keep))})")
    try:
        obj.load_state_dict({**saved, **keep})
    except (KeyError, TypeError, ValueError) as e:
        raise PrefpipeError(f"--resume: {path} is not this run's ({type(e).__name__}: {e})") from e


def load_rng(folder: Path, rank: int, device) -> None:
    """This process's RNG states; a process the checkpoint had no counterpart of keeps its own."""
    import numpy as np
    from safetensors.torch import load_file

    if not (folder / f"rng-{rank}.safetensors").exists():
        return
    tensors, saved = load_file(str(folder / f"rng-{rank}.safetensors")), read_json(folder, f"rng-{rank}.json")
    try:
        if any(t.dtype != torch.uint8 for t in tensors.values()):
            raise ValueError("generator states are uint8 tensors")
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors and getattr(device, "type", None) == "cuda":
            torch.cuda.set_rng_state(tensors["cuda"], device)
        (version, state, gauss), (name, keys, pos, has_gauss, cached) = saved["python"], saved["numpy"]
        if (name != "MT19937" or not (gauss is None or isinstance(gauss, float))
                or not all(type(v) is int for v in [version, *state, *keys, pos, has_gauss])):
            raise ValueError("python's or numpy's random state")
        random.setstate((version, tuple(state), gauss))
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, float(cached)))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PrefpipeError(f"--resume: {folder}/rng-{rank}.*: not the random states prefpipe writes ({e})") from e


def full_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The whole weights of a --full checkpoint, sharded or not (e.g. to inspect one offline)."""
    with ExitStack() as stack:
        files = TensorFiles(Path(folder), "model", stack)
        return {name: files.whole(name) for name in sorted(files.names())}
