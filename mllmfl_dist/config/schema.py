"""Configuration: one frozen dataclass per TOML section.

A config file is read with tomli, every key is checked against the dataclass of its section (unknown
sections and keys are errors), values are type-checked, and cross-field rules are validated. Overrides
from the command line (``--set section.key=value``) are parsed against the field's type, so
``--set federated.lr=0.1`` is a float and ``--set data.download=true`` a bool.

Every problem a user can cause raises :class:`ConfigError` with a message that names the key and what is
allowed; the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllmfl_dist.config.values import DSA_OPERATIONS, dsa_operations, parse_index_range, valid_index_range
from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.resources import resolve_path
from mllmfl_dist.config.run_name import is_template, resolve_run_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "DSA_OPERATIONS", "dsa_operations", "load_config", "parse_index_range"]


@dataclass(frozen=True)
class RunConfig:
    # empty: the config file's stem; may be a template over config values: "{federated.strategy}-s{run.seed}"
    name: str = ""
    root: str = "runs"  # outputs go to <root>/<name>/
    seed: int = 0
    # `run` with a stage of the method (DWP or alignment) also runs FedAvg from scratch on the same data and
    # seed in <run dir>/baseline/, which the report sets beside the method.
    baseline: bool = True


@dataclass(frozen=True)
class DistConfig:
    backend: str = "auto"  # auto: nccl when CUDA is available, else gloo
    threads: int = 1  # intra-op threads per process; CPU results depend on it, so it is fixed here
    timeout_minutes: float = 30.0  # collectives of the round loop, and rank 0's wait for idle client hosts
    control_timeout_minutes: float = 1440.0  # stage barriers while rank 0 runs long server-side work
    init_timeout_minutes: float = 10.0  # how long the ranks wait for each other to join at start-up
    wait_report_seconds: float = 60.0  # a wait on other ranks longer than this is reported (then at 2x, 4x, ...)
    server_hosts_clients: bool = False  # let rank 0 train clients too when W > 1


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # fashion_mnist | cifar10 | cifar100 | imagenet_lt | synthetic | shards
    root: str = ""  # empty: the source's default search path
    download: bool = False
    imb_factor: float = 0.01  # n_min / n_max of the long tail; 1.0 keeps the data balanced
    random_crop: bool = True
    crop_padding: int = 4
    hflip: bool = False
    # synthetic source only
    synthetic_mode: str = "array"  # array: one fixed labeled array | on_demand: generated per client
    num_classes: int = 10
    image_size: int = 16  # synthetic: generated side; imagenet_lt: side images are resized to
    channels: int = 3
    samples_per_class: int = 200  # n_max of the array mode (head class before the long tail)
    samples_per_client: int = 64  # on_demand mode
    test_per_class: int = 50
    # Labeled images per class the server keeps back from the training split before the long tail is cut
    # (the last ones of each class): a pool disjoint from every client, for align.source = "holdout".
    server_holdout_per_class: int = 0
    # Python-style "start:stop" slice of the source's training split that the run may use at all (""  = all
    # of it), before the server holdout and the long tail: keeps server-side sets such as the shipped web
    # corpus and alignment pool (Fashion-MNIST train indices 50000-59999) out of every client's data.
    train_indices: str = ""
    # imagenet_lt only: folder with ImageNet_LT_train.txt / ImageNet_LT_test.txt ("" = data.root); images
    # are decoded once, resized to data.image_size and cached as uint8 under <root>/.mllmfl_cache
    lists_dir: str = ""
    # shards source only: labeled WebDataset shards (glob or brace patterns); see shards/README.md
    train_shards: str = ""
    test_shards: str = ""


@dataclass(frozen=True)
class PartitionConfig:
    """How the training set is split among the clients (mllmfl_dist/data/partition.py)."""

    method: str = "dirichlet"  # dirichlet | creff | iid | shards
    alpha: float = 0.5  # dirichlet, creff
    # dirichlet: flwr-datasets' DirichletPartitioner options. self_balancing: a client holding more than
    # total / num_clients samples gets no share of later classes. min_partition_size: draw all classes again
    # until every client holds this many (0: draw once, then an empty client takes a sample from the largest).
    self_balancing: bool = False
    min_partition_size: int = 0
    shards_per_client: int = 2  # shards: label-sorted shards per client (McMahan et al. 2017)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet8"  # resnet8 | resnet50
    width_scale: int = 1  # resnet8 only; 4 gives the 256-d feature of CReFF
    in_channels: int = 0  # 0: the data's channel count
    channels_last: bool = True  # NHWC memory format: about 1.4x faster ResNet-8 steps on the CPU (oneDNN)
    # Backbone to start federated finetuning from: "" (random init), "pretrain" (this run's
    # <run dir>/pretrain/backbone.pt) or a path to a backbone state dict. The classifier is always new.
    pretrained_backbone: str = ""


@dataclass(frozen=True)
class FederatedConfig:
    """Defaults: the CIFAR-10-LT setting of CReFF and CLIP2FL (their released options.py), so a config that
    omits a key runs the experiment the papers describe."""

    strategy: str = "fedavg"  # fedavg | fedavgm | fedprox | creff | clip2fl
    rounds: int = 200  # num_rounds
    num_clients: int = 20
    clients_per_round: int = 8  # num_online_clients
    local_epochs: int = 10  # num_epochs_local_training
    batch_size: int = 32  # batch_size_local_training
    lr: float = 0.1  # lr_local_training
    momentum: float = 0.0
    weight_decay: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.97  # fedavgm; the released code's init_belta
    prox_mu: float = 0.01  # fedprox; the released code's mu


@dataclass(frozen=True)
class CreffConfig:
    """Classifier re-training with federated features (strategies creff and clip2fl)."""

    batch_size: int = 32  # real samples per class-gradient batch on a client (CReFF's batch_real)
    batches_per_class: int = 10  # batches per class a client averages its class gradient over
    # Differentiable Siamese Augmentation of each of those batches, as released: one of these '_'-separated
    # operations per batch, the same parameters for every image of the batch ("none": no augmentation).
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    # The server's mean of a class's gradients over the clients holding it: "clients" (each counts once, as
    # in the released code) or "samples" (weighted by the client's count of the class)
    gradient_mean: str = "clients"
    features_per_class: int = 100
    match_epochs: int = 100  # server steps of gradient matching per round
    lr_feature: float = 0.1
    crt_epochs: int = 300  # epochs of the fresh classifier over the federated features
    lr_crt: float = 0.01
    crt_batch_size: int = 32


@dataclass(frozen=True)
class Clip2flConfig:
    """CLIP2FL: distillation from a frozen open_clip model on the clients, CLIP text embeddings on the server."""

    model: str = ""  # open_clip architecture (with pretrained), hf-hub:org/repo or local-dir:DIR
    pretrained: str = ""  # open_clip pretrained tag for a named architecture (e.g. openai)
    templates: str = "a photo of a {}."  # '|'-separated prompt templates
    logit_scale: float = 100.0
    temperature: float = 3.0  # T of the clients' distillation
    alpha: float = 1.0  # weight of alpha * T^2 * KL(teacher || student)
    # Weight of the server's prototype contrast to the text embeddings: 0.001 as in the released code's
    # options.py and README (shijiangming1/CLIP2FL).
    contrast_alpha: float = 0.001
    contrast_temperature: float = 0.1
    teacher_batch_size: int = 64  # images per teacher forward when the logits are first computed


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # rounds between evaluations; the last round is always evaluated
    batch_size: int = 500


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1  # rounds between checkpoints; the last round is always saved


@dataclass(frozen=True)
class LogConfig:
    """Where rank 0 reports (mllmfl_dist/tracking/); metrics.jsonl and rounds.jsonl are always written."""

    tensorboard: bool = True
    wandb: bool = False  # Weights & Biases: pip install 'mllmfl-dist[wandb]'
    mlflow: bool = False  # MLflow: pip install 'mllmfl-dist[mlflow]'
    project: str = "mllmfl-dist"  # the W&B project and the MLflow experiment
    wandb_mode: str = ""  # "": W&B's own choice (WANDB_MODE, else online) | online | offline | disabled
    mlflow_uri: str = ""  # "": sqlite:///<run.root>/mlflow.db; or a file: / http(s):// tracking URI
    # tqdm bars while stderr is a terminal; otherwise (or false) one log line per evaluation and stage
    progress: bool = True


@dataclass(frozen=True)
class AnnotateConfig:
    """Stage 1a: an MLLM captions unlabeled images stored as WebDataset shards."""

    model: str = ""  # hub id (llava-hf/llava-1.5-7b-hf) or a local directory
    shards: str = ""  # glob or brace pattern of the input shards
    ranks: str = "rank0"  # rank0 | all: which ranks share the shards (whole shards per rank)
    batch_size: int = 16
    prompt: str = "USER: <image>\nDescribe the image in one short sentence. ASSISTANT:"
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device_map: str = ""  # "": this rank's device; "auto": accelerate spreads/offloads a large model


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The DeepSpeed engine of stage 1b, turned into a DeepSpeed config dict."""

    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 is refused where DeepSpeed lacks it, e.g. the CPU)
    gradient_accumulation_steps: int = 1
    optimizer: str = "AdamW"  # Adam | AdamW | SGD
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "WarmupCosineLR"  # none | WarmupLR | WarmupCosineLR
    warmup_steps: int = 0
    gradient_clipping: float = 1.0
    # A DeepSpeed JSON of your own (offload, ZeRO-3 options, ...) merged under the keys set here, which win.
    config_file: str = ""
    # CPU ranks all-reduce through gloo ("shm": DeepSpeed's shared-memory op, JIT-compiled on first use).
    cpu_comm: str = "gloo"


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1b: Dynamic Weighted Pretraining of the FL backbone against the frozen MLLM."""

    model: str = ""  # the MLLM; "" means annotate.model
    shards: str = ""  # annotated shards; "" means this run's <run dir>/annotate/ directory
    # all: every rank is a DeepSpeed data-parallel rank; rank0 only with one process (DeepSpeed's
    # checkpointing barriers on the whole group, so idle ranks cannot wait elsewhere)
    ranks: str = "all"
    steps: int = 200
    micro_batch_size: int = 8
    alpha_start: float = 0.0
    alpha_schedule: str = "linear"  # linear | cosine, from alpha_start to 1 over ramp_fraction of the steps
    ramp_fraction: float = 0.5
    prompt: str = "USER: <image>\nDescribe the image in one short sentence. ASSISTANT:"
    max_caption_tokens: int = 32
    heldout: int = 32  # captioned images kept out of training for the held-out losses
    checkpoint_every: int = 50  # DeepSpeed checkpoints (resume) every this many steps
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass(frozen=True)
class AlignConfig:
    """Stage 3: global alignment of the aggregated model on a small class-balanced set, on rank 0."""

    every: int = 0  # rounds between alignments; 0 turns alignment off
    # pool: labeled shards held by the server | holdout: data.server_holdout_per_class images per class kept
    # back from the training split | web: unlabeled shards pseudo-labeled by the teacher
    source: str = "pool"
    pool_shards: str = ""  # labeled shards of the pool (e.g. shards/fmnist_align/*.tar.gz)
    web_shards: str = ""  # unlabeled shards for source = "web"
    per_class: int = 20  # k images per class
    teacher: str = "none"  # none | llava | clip
    teacher_model: str = ""  # llava: hub id or directory; clip: open_clip name or local-dir:DIR
    clip_pretrained: str = ""  # open_clip pretrained tag for a named architecture (e.g. openai)
    prompt: str = "USER: <image>\nWhat is the object in the image? ASSISTANT:"  # llava teacher's question
    templates: str = "a photo of a {}."  # clip teacher's prompt templates, separated by '|'
    teacher_temperature: float = 1.0  # softmax temperature of the teacher's class scores
    steps: int = 20
    lr: float = 0.01
    batch_size: int = 64
    beta: float = 1.0
    # T of the distillation term: 1 gives the paper's CE(y, p) + beta * KL(q || p); otherwise both sides are
    # tempered as in standard distillation, beta * T^2 * KL(q_T || p_T), q_T proportional to q^(1/T).
    temperature: float = 1.0
    train: str = "classifier"  # classifier | all


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    creff: CreffConfig = field(default_factory=CreffConfig)
    clip2fl: Clip2flConfig = field(default_factory=Clip2flConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines: list[str] = []

        def table(name: str, values: dict[str, Any]) -> None:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict))
            lines.append("")
            for k, v in values.items():
                if isinstance(v, dict):
                    table(f"{name}.{k}", v)

        for section, values in self.to_dict().items():
            table(section, values)
        return "\n".join(lines)


CHOICES: dict[str, tuple[str, ...]] = {
    "dist.backend": ("auto", "gloo", "nccl"),
    "data.source": ("synthetic", "fashion_mnist", "cifar10", "cifar100", "imagenet_lt", "shards"),
    "data.synthetic_mode": ("array", "on_demand"),
    "partition.method": ("dirichlet", "creff", "iid", "shards"),
    "model.arch": ("resnet8", "resnet50"),
    "federated.strategy": ("fedavg", "fedavgm", "fedprox", "creff", "clip2fl"),
    "annotate.ranks": ("rank0", "all"),
    "annotate.dtype": ("float32", "bfloat16", "float16", "auto"),
    "annotate.device_map": ("", "auto"),
    "pretrain.ranks": ("rank0", "all"),
    "pretrain.alpha_schedule": ("linear", "cosine"),
    "pretrain.deepspeed.precision": ("fp32", "bf16", "fp16"),
    "pretrain.deepspeed.optimizer": ("Adam", "AdamW", "SGD"),
    "pretrain.deepspeed.scheduler": ("none", "WarmupLR", "WarmupCosineLR"),
    "pretrain.deepspeed.cpu_comm": ("gloo", "shm"),
    "align.source": ("pool", "holdout", "web"),
    "creff.gradient_mean": ("clients", "samples"),
    "align.teacher": ("none", "llava", "clip"),
    "align.train": ("classifier", "all"),
    "log.wandb_mode": ("", "online", "offline", "disabled"),
}

Rule = tuple[typing.Callable[[Any], bool], str]

def _int_at_least(low: int) -> Rule:
    return (lambda v: v >= low, f"an integer >= {low}")


_POSITIVE: Rule = (lambda v: v > 0, "a number > 0")
_FRACTION: Rule = (lambda v: 0 <= v < 1, "a number in [0, 1)")
# Prompts sent with an image: LLaVA's processor puts its visual tokens where <image> stands, and fails only
# after the model has loaded when it is missing or doubled.
_IMAGE_PROMPT: Rule = (lambda v: v.count("<image>") == 1, "a prompt holding <image> exactly once (where the "
                       "image's tokens go), e.g. 'USER: <image>\\nDescribe the image. ASSISTANT:'")

# Bounds checked for every config: key -> (predicate, what is allowed).
_RULES: dict[str, Rule] = {
    "run.name": (lambda v: "/" not in v and v not in ("", ".", ".."), "a non-empty name without '/'"),
    "run.seed": _int_at_least(0),
    "dist.threads": _int_at_least(1),
    "dist.timeout_minutes": _POSITIVE,
    "dist.control_timeout_minutes": _POSITIVE,
    "dist.init_timeout_minutes": _POSITIVE,
    "dist.wait_report_seconds": _POSITIVE,
    "data.imb_factor": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "data.crop_padding": _int_at_least(0),
    "data.num_classes": _int_at_least(2),
    "data.image_size": _int_at_least(8),
    "data.channels": _int_at_least(1),
    "data.samples_per_class": _int_at_least(1),
    "data.samples_per_client": _int_at_least(1),
    "data.test_per_class": _int_at_least(1),
    "data.server_holdout_per_class": _int_at_least(0),
    "data.train_indices": (valid_index_range, 'a "start:stop" range of non-negative integers, start < stop '
                                               '(either may be omitted), or "" for the whole split'),
    "partition.alpha": _POSITIVE,
    "annotate.prompt": _IMAGE_PROMPT,
    "pretrain.prompt": _IMAGE_PROMPT,
    "align.prompt": _IMAGE_PROMPT,
    "partition.min_partition_size": _int_at_least(0),
    "partition.shards_per_client": _int_at_least(1),
    "model.width_scale": _int_at_least(1),
    "model.in_channels": (lambda v: v >= 0, "an integer >= 0 (0: the data's channel count)"),
    "federated.rounds": _int_at_least(1),
    "federated.num_clients": _int_at_least(1),
    "federated.clients_per_round": _int_at_least(1),
    "federated.local_epochs": _int_at_least(1),
    "federated.batch_size": _int_at_least(1),
    "federated.lr": _POSITIVE,
    "federated.momentum": _FRACTION,
    "federated.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "federated.server_lr": _POSITIVE,
    "federated.server_momentum": _FRACTION,
    "federated.prox_mu": (lambda v: v >= 0, "a number >= 0"),
    "creff.batch_size": _int_at_least(1),
    "creff.batches_per_class": _int_at_least(1),
    "creff.dsa_strategy": (lambda v: all(op in DSA_OPERATIONS for op in dsa_operations(v)),
                           f"'none' or operations from {', '.join(DSA_OPERATIONS)} joined by '_'"),
    "creff.features_per_class": _int_at_least(1),
    "creff.match_epochs": _int_at_least(0),
    "creff.lr_feature": _POSITIVE,
    "creff.crt_epochs": _int_at_least(1),
    "creff.lr_crt": _POSITIVE,
    "creff.crt_batch_size": _int_at_least(1),
    "clip2fl.logit_scale": _POSITIVE,
    "clip2fl.temperature": _POSITIVE,
    "clip2fl.alpha": (lambda v: v >= 0, "a number >= 0"),
    "clip2fl.contrast_alpha": (lambda v: v >= 0, "a number >= 0"),
    "clip2fl.contrast_temperature": _POSITIVE,
    "clip2fl.teacher_batch_size": _int_at_least(1),
    "annotate.batch_size": _int_at_least(1),
    "annotate.max_new_tokens": _int_at_least(1),
    "annotate.temperature": _POSITIVE,
    "annotate.top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "annotate.num_beams": _int_at_least(1),
    "pretrain.steps": _int_at_least(1),
    "pretrain.micro_batch_size": _int_at_least(1),
    "pretrain.alpha_start": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "pretrain.ramp_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "pretrain.max_caption_tokens": _int_at_least(1),
    "pretrain.heldout": _int_at_least(1),
    "pretrain.checkpoint_every": _int_at_least(1),
    "pretrain.deepspeed.zero_stage": (lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3"),
    "pretrain.deepspeed.gradient_accumulation_steps": _int_at_least(1),
    "pretrain.deepspeed.lr": _POSITIVE,
    "pretrain.deepspeed.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "pretrain.deepspeed.warmup_steps": _int_at_least(0),
    "pretrain.deepspeed.gradient_clipping": (lambda v: v >= 0, "a number >= 0 (0: off)"),
    "align.every": _int_at_least(0),
    "align.per_class": _int_at_least(1),
    "align.teacher_temperature": _POSITIVE,
    "align.steps": _int_at_least(1),
    "align.lr": _POSITIVE,
    "align.batch_size": _int_at_least(1),
    "align.beta": (lambda v: v >= 0, "a number >= 0"),
    "align.temperature": _POSITIVE,
    "eval.every": _int_at_least(1),
    "eval.batch_size": _int_at_least(1),
    "checkpoint.every": _int_at_least(1),
}


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML file, apply ``section.key=value`` overrides, validate, and return a frozen Config.
    ``configs/NAME.toml`` not found in the working directory is the shipped config
    (:mod:`mllmfl_dist.core.resources`)."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for item in overrides:
        keys, value = _parse_override(item)
        table = raw
        for depth, key in enumerate(keys[:-1]):
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{'.'.join(keys[: depth + 1])}] must be a table")
        table[keys[-1]] = value
    raw.setdefault("run", {})
    if isinstance(raw["run"], dict) and not raw["run"].get("name"):
        raw["run"]["name"] = path.stem
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    config = _build(Config, raw, "")
    if is_template(config.run.name):  # "{federated.strategy}-s{run.seed}": resolved after every override
        name = resolve_run_name(config.run.name, flat_items(config.to_dict()))
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))
    validate(config)
    return config


def _build(cls: type, values: dict[str, Any], prefix: str):
    """Instantiate dataclass ``cls`` from a TOML table, recursing into nested tables."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            if not prefix:
                raise ConfigError(f"unknown section [{key}]; allowed: {', '.join(hints)}")
            raise ConfigError(f"unknown key {name}; allowed: {', '.join(hints)}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table of keys")
            kwargs[key] = _build(hints[key], value, f"{name}.")
        else:
            kwargs[key] = _check_type(name, hints[key], value)
    return cls(**kwargs)


def _check_type(name: str, expected: type, value: Any) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    wrong_bool = expected is not bool and isinstance(value, bool)
    if wrong_bool or not isinstance(value, expected):
        raise ConfigError(f"{name} must be {_type_name(expected)}, got {value!r}")
    return value


def _type_name(tp: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` (or ``section.table.key=value``) -> (keys, typed value)."""
    name, sep, text = item.partition("=")
    keys = name.strip().split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    cls: type = Config
    for depth, key in enumerate(keys):
        hints = typing.get_type_hints(cls)
        if key not in hints:
            where = f"section [{key}]" if depth == 0 else f"key {'.'.join(keys[: depth + 1])}"
            raise ConfigError(f"unknown {where} in --set {item!r}; allowed: {', '.join(hints)}")
        cls = hints[key]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"--set {item!r} names a table; set one of its keys")
    return keys, _parse_value(name.strip(), cls, text.strip())


def _parse_value(name: str, tp: type, text: str) -> Any:
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{name} must be true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{name} must be {_type_name(tp)}, got {text!r}") from None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


def flat_items(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1, "c": {"d": 2}}}`` -> ``{"a.b": 1, "a.c.d": 2}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate(config: Config) -> None:
    values = flat_items(config.to_dict())
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise ConfigError(f"{key} = {values[key]!r} is not allowed; choose one of: {', '.join(allowed)}")
    for key, (ok, allowed) in _RULES.items():
        if not ok(values[key]):
            raise ConfigError(f"{key} = {values[key]!r} is not allowed; it must be {allowed}")
    fed = config.federated
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"federated.clients_per_round = {fed.clients_per_round} is not allowed; it must be <= "
            f"federated.num_clients ({fed.num_clients})"
        )
    if fed.strategy == "clip2fl":
        if not config.clip2fl.model.strip():
            raise ConfigError("federated.strategy = 'clip2fl' needs clip2fl.model (an open_clip architecture with "
                              "clip2fl.pretrained, hf-hub:org/repo, or local-dir:DIR)")
        if config.data.synthetic_mode != "array":
            raise ConfigError("federated.strategy = 'clip2fl' caches teacher logits per training sample; it needs "
                              "data.synthetic_mode = 'array'")
    if config.data.source != "synthetic" and config.data.synthetic_mode != "array":
        raise ConfigError("data.synthetic_mode = 'on_demand' is only allowed with data.source = 'synthetic'")
    part = config.partition
    if config.data.synthetic_mode == "on_demand" and (part.method == "shards" or part.self_balancing
                                                      or part.min_partition_size):
        # On-demand clients draw their own label mix; there is no whole training set to cut.
        raise ConfigError("data.synthetic_mode = 'on_demand' supports partition.method dirichlet, creff or iid "
                          "without partition.self_balancing or partition.min_partition_size")


# Keys that may change when a run is resumed: they do not change what a completed round computed (where a
# run lives is not part of what it computes, so a moved or renamed run directory resumes).
RESUMABLE_CHANGES = ("run.root", "run.name", "run.baseline", "federated.rounds", "data.root", "data.download",
                     "dist.backend",
                     "dist.timeout_minutes", "dist.control_timeout_minutes", "dist.init_timeout_minutes",
                     "dist.wait_report_seconds", "eval.", "checkpoint.", "log.",
                     "clip2fl.teacher_batch_size",
                     # the federated checkpoint already holds what stage 1 produced
                     "annotate.", "pretrain.")


# Sections only some strategies read.
STRATEGY_SECTIONS = {"creff.": ("creff", "clip2fl"), "clip2fl.": ("clip2fl",)}


def resume_differences(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """``key: old -> new`` for every setting that differs and would change the results of a resumed run."""
    differences = []
    saved_items = flat_items(saved)
    # Sections a run does not read cannot change its results (so `compare` may add clip2fl.model or change
    # the mllm method's [align] after the baselines finished).
    strategy = current.get("federated", {}).get("strategy")
    unread = tuple(section for section, readers in STRATEGY_SECTIONS.items() if strategy not in readers)
    if current.get("align", {}).get("every") == 0 and saved.get("align", {}).get("every", 0) == 0:
        unread += ("align.",)  # alignment off before and after
    for name, value in flat_items(current).items():
        old = saved_items.get(name, value)
        if old != value and not any(name == k or (k.endswith(".") and name.startswith(k))
                                    for k in (*RESUMABLE_CHANGES, *unread)):
            differences.append(f"{name}: {old!r} -> {value!r}")
    return differences


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)

