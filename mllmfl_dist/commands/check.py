"""``check CONFIG``: what a run of the config will use, and whether it is there, in one table, in seconds.

Loads no weights and imports neither transformers, DeepSpeed nor open_clip: models are resolved to their files
(:mod:`mllmfl_dist.mllm.model_files`), data and shards are looked up (:mod:`.check_inputs`), the run
directory and the world go through the start-up checks of :mod:`mllmfl_dist.core.preflight` (and DWP's
global batch through the split the pretrain stage makes at start), and the memory
per rank of each stage and the disk the run writes are estimated (:mod:`.check_footprint`). Exit 0 when
everything is there; otherwise one line per missing thing after the table, and exit 2.

The world is the one launched (under torchrun / srun), the one given (``--nnodes``, ``--nproc-per-node``,
``--gpus-per-node``: what the sbatch scripts pass), or on one process the config's usual launch: the
``--nproc_per_node N`` of the ``torchrun`` line its header comment starts with.
``run`` calls :func:`refuse_missing` first, so a job that would fail on a missing file fails at once with the
same lines (memory estimates only warn there: they are estimates).
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mllmfl_dist.commands import check_footprint as fp
from mllmfl_dist.commands.check_inputs import Findings, Row, find_data, find_models, find_stage_shards
from mllmfl_dist.core import preflight
from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.resources import resolve_path

COMMAND_STAGES = {"annotate": ["annotate"], "pretrain": ["pretrain"], "federate": ["federate"]}
LAUNCH_LINE = re.compile(r"--nproc[_-]per[_-]node[ =](\d+)")
NODES_LINE = re.compile(r"--nnodes[ =](\d+)")


@dataclass(frozen=True)
class World:
    """Ranks, nodes, ranks per node, GPUs per node (and each one's bytes), the resolved backend, and how the
    world was told (``launched``, ``given``, ``config launch line``, ``one process``)."""

    nodes: int
    per_node: int
    gpus: int
    gpu_bytes: int | None
    backend: str
    how: str

    @property
    def ranks(self) -> int:
        return self.nodes * self.per_node


def stages_for(cfg, command: str) -> list[str]:
    from mllmfl_dist.commands.pipeline import planned_stages  # imports every stage: only for run, compare

    return COMMAND_STAGES.get(command) or planned_stages(cfg)


def gpu_memory_bytes() -> int | None:
    """The smallest visible GPU's memory (``nvidia-smi``; no CUDA context is made), None without one."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sizes = [int(v) for v in result.stdout.split() if v.isdigit()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible and all(v.isdigit() for v in visible.split(",")):
        sizes = [sizes[int(v)] for v in visible.split(",") if int(v) < len(sizes)]
    return min(sizes) * 2**20 if result.returncode == 0 and sizes else None


def planned_world(
    cfg,
    config_path: str,
    nnodes: int | None = None,
    nproc: int | None = None,
    gpus: int | None = None,
    env: dict[str, str] | None = None,
) -> World:
    env = dict(os.environ if env is None else env)
    launched = ("RANK" in env and "WORLD_SIZE" in env) or (
        "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
    )
    if launched:
        ranks = int(env.get("WORLD_SIZE") or env.get("SLURM_STEP_NUM_TASKS"))
        per_node = preflight.local_world_size(env)
        nodes, how = math.ceil(ranks / per_node), "launched"
    elif nproc:
        per_node, nodes, how = nproc, nnodes or 1, "given"
    else:
        header = "".join(line for line in _head(config_path) if line.startswith("#"))
        found, nodes_found = LAUNCH_LINE.search(header), NODES_LINE.search(header)
        per_node = int(found.group(1)) if found else 1
        nodes = nnodes or (int(nodes_found.group(1)) if nodes_found else 1)
        how = "the config's launch line" if found else "one process"
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if gpus > 0 else "gloo")
    return World(nodes, per_node, gpus, gpu_memory_bytes() if gpus else None, backend, how)


def _head(path: str) -> list[str]:
    try:
        with open(resolve_path(path)) as handle:
            return [handle.readline() for _ in range(3)]
    except OSError:
        return []


def check_world(world: World, out: Findings) -> None:
    problem = preflight.local_ranks_problem(world.per_node, world.gpus, world.backend)
    if world.backend == "nccl" and world.gpus == 0:
        problem = "dist.backend = 'nccl' needs CUDA GPUs and none are visible; use 'gloo' or 'auto'"
    gpu = f", {fp.gib(world.gpu_bytes)} each" if world.gpu_bytes else ""
    out.add(
        "world",
        world.how,
        problem,
        f"{world.ranks} rank(s) on {world.nodes} node(s), {world.per_node} per "
        f"node; {world.gpus} GPU(s) per node{gpu}; backend {world.backend}",
    )


def check_dwp_batch(cfg, stages: list[str], world: World, out: Findings) -> None:
    """DWP's samples per optimizer step on the planned world, or the refusal the job would give at start: a
    ``pretrain.global_batch_size`` that the world's micro-batches do not split into."""
    if "pretrain" not in stages:
        return
    # Imports torch, which only a check that plans DWP needs.
    from mllmfl_dist.stages.deepspeed_setup import accumulation_steps

    pcfg = cfg.pretrain
    try:
        steps = accumulation_steps(pcfg, world.ranks)
    except ConfigError as err:
        out.add("world", "DWP batch per step", str(err), "")
        return
    fixed = "pretrain.global_batch_size" if pcfg.global_batch_size else "changes with the ranks: global_batch_size 0"
    out.add(
        "world",
        "DWP batch per step",
        None,
        f"{pcfg.micro_batch_size * steps * world.ranks} samples = micro-batch {pcfg.micro_batch_size} x {steps} "
        f"accumulated x {world.ranks} rank(s) ({fixed})",
    )


def check_memory(cfg, stages: list[str], world: World, out: Findings) -> dict[str, int]:
    """A row per stage with its estimated peak per rank against what a rank has; returns the FL model's and
    DWP's parameter counts for the disk estimate."""
    host = preflight.physical_memory_bytes()
    classes, channels, side = fp.data_shape(cfg)
    fl, backbone, map_channels, activations = fp.fl_model_size(cfg, classes, channels, side)
    sizes = {"fl": fl, "backbone": backbone, "trainable": 0}
    rows: list[fp.StageMemory] = []
    models = out.models
    if "annotate" in stages and "annotate" in models:
        info, element = models["annotate"], fp.dtype_bytes(cfg.annotate.dtype, models["annotate"])
        weights = info.bytes_at(element)
        cache = None
        if weights is not None and info.config:
            geo = fp.LlavaGeometry.from_config(info.config)
            tokens = geo.image_tokens + fp.PROMPT_TOKENS + cfg.annotate.max_new_tokens
            cache = (
                2
                * geo.layers
                * geo.kv_hidden
                * tokens
                * cfg.annotate.batch_size
                * cfg.annotate.num_beams
                * (element or 2)
            )
        rows.append(
            fp.StageMemory(
                "annotate",
                weights,
                None if cache is None else weights + cache,
                f"MLLM at {cfg.annotate.dtype} + KV cache of batch {cfg.annotate.batch_size}",
            )
        )
    if "pretrain" in stages and "pretrain" in models:
        ds, info = cfg.pretrain.deepspeed, models["pretrain"]
        element = fp.PRECISION_BYTES[ds.precision]
        sure = total = None
        if info.params and info.config:
            geo = fp.LlavaGeometry.from_config(info.config)
            sizes["trainable"] = backbone + fp.adapter_params(map_channels, geo)
            dp = world.ranks if cfg.pretrain.ranks == "all" else 1
            sure = info.params * element + fp.zero_bytes(
                sizes["trainable"], ds.precision, ds.optimizer, ds.zero_stage, dp
            )
            tokens = geo.image_tokens + fp.PROMPT_TOKENS + cfg.pretrain.max_caption_tokens
            total = sure + fp.llm_activations(geo, tokens, cfg.pretrain.micro_batch_size, element)
        trainable = f"{sizes['trainable'] / 1e6:.1f} M" if sizes["trainable"] else "?"
        rows.append(
            fp.StageMemory(
                "pretrain",
                sure,
                total,
                f"frozen MLLM at {ds.precision} + DWP's "
                f"{trainable} trainable under ZeRO-{ds.zero_stage} + "
                f"LLM activations of micro-batch {cfg.pretrain.micro_batch_size}",
            )
        )
    if "federate" in stages:
        hosts = world.ranks if world.ranks == 1 or cfg.dist.server_hosts_clients else world.ranks - 1
        clip = models.get("clip2fl") if cfg.federated.strategy == "clip2fl" else None
        extra = (clip.bytes_at(4) or 0) if clip else 0
        state = fp.client_state_bytes(cfg, fp.client_state_width(cfg, classes, channels, side))
        total = fp.federate_memory(cfg, fl, activations, hosts, extra + state)
        kept = f", client state {state / 2**20:.1f} MiB" if state else ""
        rows.append(
            fp.StageMemory(
                "federate",
                total,
                total,
                f"{cfg.model.arch} ({fl / 1e6:.2f} M params), "
                f"per-client updates{kept}, activations of batch {cfg.federated.batch_size}",
            )
        )
        if cfg.align.every > 0 and "teacher" in models:
            weights = models["teacher"].bytes_at(4)
            rows.append(fp.StageMemory("align (rank 0)", weights, weights, f"{cfg.align.teacher} teacher at float32"))
    device = "GPU" if world.backend == "nccl" else "host RAM"
    for row in rows:
        shared = world.backend != "nccl" and not row.stage.startswith("align")
        have = world.gpu_bytes if world.backend == "nccl" else (host // world.per_node if shared and host else host)
        detail = f"~{fp.gib(row.total)} per rank ({row.parts}); {device} per rank {fp.gib(have)}"
        problem = None
        if have and row.sure is not None and row.sure > have:
            problem = (
                f"{row.stage}: its weights and training state alone need about {fp.gib(row.sure)} per rank, "
                f"over the {fp.gib(have)} of {device} a rank has ({row.parts})"
            )
        elif have and row.total is not None and row.total > have:
            out.warnings.append(
                f"{row.stage}: estimated peak {fp.gib(row.total)} per rank may not fit the "
                f"{fp.gib(have)} of {device} a rank has ({row.parts})"
            )
        out.rows.append(Row("memory", row.stage, "TOO BIG" if problem else "estimate", problem or detail))
        if problem:
            out.too_big.append(problem)
    return sizes


def check_run_dir(cfg, stages: list[str], sizes: dict[str, int], annotated: int, out: Findings) -> None:
    try:
        run_dir = preflight.check_run_dir(cfg.run.root, cfg.run.name)
    except ConfigError as err:
        out.add("run dir", str(cfg.run_dir), str(err), "")
        return
    ds = cfg.pretrain.deepspeed
    writes = 0
    if "annotate" in stages:
        writes += annotated
    if "pretrain" in stages:
        # two DeepSpeed checkpoints (the latest and the one being written) and the backbone
        writes += 2 * sizes["trainable"] * (fp.PRECISION_BYTES[ds.precision] + 12) + 4 * sizes["backbone"]
    runs = 1 + ("baseline" in stages)
    writes += runs * 3 * 4 * sizes["fl"]  # checkpoint (model and strategy state) and final model
    free = preflight.free_disk_bytes(run_dir)
    detail = f"writable; writes ~{fp.gib(writes)} (estimate), {fp.gib(free)} free"
    if free is not None and writes > free:
        problem = f"run directory {run_dir}: the run writes about {fp.gib(writes)}, only {fp.gib(free)} free there"
        out.rows.append(Row("run dir", str(run_dir), "TOO BIG", problem))
        out.too_big.append(problem)
    else:
        out.rows.append(Row("run dir", str(run_dir), "ok", detail))


def gather(cfg, command: str, world: World | None) -> Findings:
    """Everything the table shows; ``world`` None skips the world and memory rows (``run``'s gate)."""
    out = Findings()
    stages = stages_for(cfg, command)
    find_models(cfg, stages, command, out)
    find_data(cfg, out)
    annotated = find_stage_shards(cfg, stages, out)
    backbone = cfg.model.pretrained_backbone
    if backbone and (backbone != "pretrain" or "pretrain" not in stages):
        path = cfg.paths.backbone if backbone == "pretrain" else Path(backbone).expanduser()
        out.add(
            "model",
            f"model.pretrained_backbone {backbone}",
            None
            if path.is_file()
            else f"model.pretrained_backbone: {path} not found; run pretrain first, or set it to a backbone file",
            str(path),
        )
    if world is not None:
        check_world(world, out)
        check_dwp_batch(cfg, stages, world, out)
        sizes = check_memory(cfg, stages, world, out)
        check_run_dir(cfg, stages, sizes, annotated, out)
    return out


def table(rows) -> str:
    widths = [max(len(getattr(r, key)) for r in rows) for key in ("group", "name", "status")]
    widths = [min(width, cap) for width, cap in zip(widths, (8, 60, 7))]
    return "\n".join(
        f"{r.group:<{widths[0]}}  {r.name:<{widths[1]}}  {r.status:<{widths[2]}}  {r.detail}" for r in rows
    )


def run_check(cfg, config_path: str, command: str, nnodes: int | None, nproc: int | None, gpus: int | None) -> int:
    """Print the table (rank 0) and the missing things (local rank 0 of each node); 0 or 2."""
    world = planned_world(cfg, config_path, nnodes, nproc, gpus)
    out = gather(cfg, command, world)
    env = os.environ
    if env.get("RANK", env.get("SLURM_PROCID", "0")) == "0":
        print(f"check {config_path} for {command}: {' -> '.join(stages_for(cfg, command))}")
        print(table(out.rows))
        for line in out.warnings:
            print(f"warning: {line}")
    problems = out.missing + out.too_big
    if problems and env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")) == "0":
        where = f" on {socket.gethostname()}" if world.nodes > 1 else ""
        print(f"{len(problems)} thing(s) missing or too big{where}:", file=sys.stderr)
        for line in problems:
            print(f"missing: {line}" if line in out.missing else f"too big: {line}", file=sys.stderr)
    return 2 if problems else 0


def refuse_missing(cfg, command: str) -> None:
    """``run``'s first step: ConfigError with one line per missing model, data file or shard pattern."""
    out = gather(cfg, command, None)
    if out.missing:
        lines = "\n".join(f"missing: {line}" for line in out.missing)
        raise ConfigError(
            f"{len(out.missing)} thing(s) the run needs are missing (`python -m mllmfl_dist check "
            f"CONFIG` shows all it uses):\n{lines}"
        )
