"""The config schema: one frozen dataclass per TOML section, each field with its default and, where it has
them, its choices and bounds (:mod:`mllmfl_dist.config.fields`).

The run's own sections are fields of :class:`Config`. The sections a strategy reads (``[creff]``,
``[clip2fl]``, a plugin's) are declared by the strategy (``Strategy.sections``) and held in
``Config.strategy_sections``: they load, check, write and resume like ours (:mod:`mllmfl_dist.config.plugins`).
Loading and checking: :mod:`mllmfl_dist.config.loader`; what a resume may change: :mod:`mllmfl_dist.config.resume`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from mllmfl_dist.config import plugins
from mllmfl_dist.config.fields import (
    at_least,
    checked,
    choice,
    fraction,
    image_prompt,
    minutes,
    non_negative,
    path_setting,
    positive,
    unit_interval,
)
from mllmfl_dist.config.values import valid_index_range
from mllmfl_dist.core import preflight
from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.layout import RunLayout

# The prompts' defaults, each written once (a user's prompt must hold <image> exactly once).
CAPTION_PROMPT = "USER: <image>\nDescribe the image in one short sentence. ASSISTANT:"  # annotation and DWP
CLASS_QUESTION_PROMPT = "USER: <image>\nWhat is the object in the image? ASSISTANT:"  # the llava teacher


# What decoding one image may cost, in every section that reads images (data/images.py ImageBounds): decoded
# pixels (after JPEG draft scaling; 50 M pixels is 150 MB as RGB) and long side / short side (a model's
# resize of the short side to its input builds input_side^2 * ratio pixels before the centre crop).
def _max_image_pixels() -> Any:
    return at_least(50_000_000, 1)


def _max_image_aspect_ratio() -> Any:
    return checked(20.0, lambda v: v >= 1, "a number >= 1 (long side / short side)")


@dataclass(frozen=True)
class RunConfig:
    # empty: the config file's stem; may be a template over config values: "{federated.strategy}-s{run.seed}"
    name: str = checked(
        "",
        lambda v: preflight.run_name_problem(v) is None,
        "a non-empty name without '/' or control characters, at most 255 bytes",
    )
    root: str = path_setting("runs")  # outputs go to <root>/<name>/
    seed: int = at_least(0, 0)
    # `run` with a stage of the method (DWP or alignment) also runs FedAvg from scratch on the same data and
    # seed in <run dir>/baseline/, which the report sets beside the method.
    baseline: bool = True


@dataclass(frozen=True)
class DistConfig:
    backend: str = choice("auto", ("auto", "gloo", "nccl"))  # auto: nccl when CUDA is available, else gloo
    threads: int = at_least(1, 1)  # intra-op threads per process; CPU results depend on it, so it is fixed here
    timeout_minutes: float = minutes(30.0)  # collectives of the round loop, and rank 0's wait for idle client hosts
    control_timeout_minutes: float = minutes(1440.0)  # stage barriers while rank 0 runs long server-side work
    init_timeout_minutes: float = minutes(10.0)  # how long the ranks wait for each other to join at start-up
    # a wait on other ranks longer than this is reported (then at 2x, 4x, ...)
    wait_report_seconds: float = positive(60.0)
    server_hosts_clients: bool = False  # let rank 0 train clients too when W > 1


@dataclass(frozen=True)
class DataConfig:
    source: str = choice("synthetic", ("synthetic", "fashion_mnist", "cifar10", "cifar100", "imagenet_lt", "shards"))
    root: str = path_setting("")  # empty: the source's default search path
    download: bool = False
    imb_factor: float = unit_interval(0.01)  # n_min / n_max of the long tail; 1.0 keeps the data balanced
    random_crop: bool = True
    crop_padding: int = at_least(4, 0)
    hflip: bool = False
    # synthetic source only
    # array: one fixed labeled array | on_demand: generated per client
    synthetic_mode: str = choice("array", ("array", "on_demand"))
    num_classes: int = at_least(10, 2)
    image_size: int = at_least(16, 8)  # synthetic: generated side; imagenet_lt: side images are resized to
    channels: int = at_least(3, 1)
    samples_per_class: int = at_least(200, 1)  # n_max of the array mode (head class before the long tail)
    samples_per_client: int = at_least(64, 1)  # on_demand mode
    test_per_class: int = at_least(50, 1)
    # Labeled images per class the server keeps back from the training split before the long tail is cut
    # (the last ones of each class): a pool disjoint from every client, for align.source = "holdout".
    server_holdout_per_class: int = at_least(0, 0)
    # Labeled images per class carved from the training split for validation (hyperparameters are chosen on
    # them, never on the test set): the val_per_class images of each class just before the holdout's, before
    # the long tail, so the split is balanced and disjoint from the clients, the holdout and the test set.
    # 0: no validation split (the clients' data are those of a config without the key).
    val_per_class: int = at_least(0, 0)
    # Fraction of each class of the long-tailed training set the clients hold (seeded per class, at least one
    # image of each class), cut before the partition: the low-data experiment. 1.0 keeps it all.
    train_fraction: float = unit_interval(1.0)
    # Python-style "start:stop" slice of the source's training split that the run may use at all (""  = all
    # of it), before the server holdout and the long tail: keeps server-side sets such as the shipped web
    # corpus and alignment pool (Fashion-MNIST train indices 50000-59999) out of every client's data.
    train_indices: str = checked(
        "",
        valid_index_range,
        'a "start:stop" range of non-negative integers, '
        'start < stop (either may be omitted), or "" for the whole split',
    )
    # imagenet_lt only: folder with ImageNet_LT_train.txt / ImageNet_LT_test.txt ("" = data.root); images
    # are decoded once, resized to data.image_size and cached as uint8 under <root>/.mllmfl_cache
    lists_dir: str = path_setting("")
    # shards source only: labeled WebDataset shards (glob or brace patterns); see shards/README.md
    train_shards: str = path_setting("")
    test_shards: str = path_setting("")
    # shards and imagenet_lt: an image over either bound is refused, naming the shard and member (or file)
    max_image_pixels: int = _max_image_pixels()
    max_image_aspect_ratio: float = _max_image_aspect_ratio()


@dataclass(frozen=True)
class PartitionConfig:
    """How the training set is split among the clients (mllmfl_dist/data/partition.py)."""

    method: str = choice("dirichlet", ("dirichlet", "creff", "iid", "shards"))
    alpha: float = positive(0.5)  # dirichlet, creff
    # dirichlet: flwr-datasets' DirichletPartitioner options. self_balancing: a client holding more than
    # total / num_clients samples gets no share of later classes. min_partition_size: draw all classes again
    # until every client holds this many (0: draw once, then an empty client takes a sample from the largest).
    self_balancing: bool = False
    min_partition_size: int = at_least(0, 0)
    shards_per_client: int = at_least(2, 1)  # shards: label-sorted shards per client (McMahan et al. 2017)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = choice("resnet8", ("resnet8", "resnet50"))
    width_scale: int = at_least(1, 1)  # resnet8 only; 4 gives the 256-d feature of CReFF
    in_channels: int = non_negative(0, "an integer >= 0 (0: the data's channel count)")
    channels_last: bool = True  # NHWC memory format: about 1.4x faster ResNet-8 steps on the CPU (oneDNN)
    # Backbone to start federated finetuning from: "" (random init), "pretrain" (this run's
    # <run dir>/pretrain/backbone.pt) or a path to a backbone state dict. The classifier is always new.
    pretrained_backbone: str = path_setting("")


@dataclass(frozen=True)
class FederatedConfig:
    """Defaults: the CIFAR-10-LT setting of CReFF and CLIP2FL (their released options.py), so a config that
    omits a key runs the experiment the papers describe."""

    strategy: str = "fedavg"  # a registered strategy (config/plugins.py): fedavg, fedavgm, fedprox, creff, clip2fl, ...
    rounds: int = at_least(200, 1)  # num_rounds
    num_clients: int = at_least(20, 1)
    clients_per_round: int = at_least(8, 1)  # num_online_clients
    local_epochs: int = at_least(10, 1)  # num_epochs_local_training
    batch_size: int = at_least(32, 1)  # batch_size_local_training
    lr: float = positive(0.1)  # lr_local_training
    momentum: float = fraction(0.0)
    weight_decay: float = non_negative(0.0)
    server_lr: float = positive(1.0)  # every strategy's server step
    server_momentum: float = fraction(0.97)  # fedavgm; the released code's init_belta
    prox_mu: float = non_negative(0.01)  # fedprox; the released code's mu
    # Rank 0's memory for per-client state (scaffold, feddyn); beyond it entries go to <run>/federated/client_state
    client_state_mb: float = non_negative(256.0)
    # Clients a host trains at once as one stacked model (fl/vectorized.py; fedavg, fedavgm, fedprox, fedopt);
    # 1: one after another. Pays off where steps are small (many clients, batches of 4 or fewer on the CPU, not
    # dependably at 8; on GPUs, where launch overhead dominates, expected more, not measured yet):
    # docs/explanation/performance.md
    vectorize: int = at_least(1, 1)


@dataclass(frozen=True)
class EvalConfig:
    every: int = at_least(1, 1)  # rounds between evaluations; the last round is always evaluated
    batch_size: int = at_least(500, 1)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = at_least(1, 1)  # rounds between checkpoints; the last round is always saved


@dataclass(frozen=True)
class LogConfig:
    """Where rank 0 reports (mllmfl_dist/tracking/); metrics.jsonl and rounds.jsonl are always written."""

    tensorboard: bool = True
    wandb: bool = False  # Weights & Biases: pip install 'mllmfl-dist[wandb]'
    mlflow: bool = False  # MLflow: pip install 'mllmfl-dist[mlflow]'
    project: str = "mllmfl-dist"  # the W&B project and the MLflow experiment
    # "": W&B's own choice (WANDB_MODE, else online) | online | offline | disabled
    wandb_mode: str = choice("", ("", "online", "offline", "disabled"))
    mlflow_uri: str = path_setting("")  # "": sqlite:///<run.root>/mlflow.db; or a file: / http(s):// tracking URI
    # tqdm bars while stderr is a terminal; otherwise (or false) one log line per evaluation and stage
    progress: bool = True


@dataclass(frozen=True)
class AnnotateConfig:
    """Stage 1a: an MLLM captions unlabeled images stored as WebDataset shards."""

    model: str = path_setting("")  # hub id (llava-hf/llava-1.5-7b-hf) or a local directory
    shards: str = path_setting("")  # glob or brace pattern of the input shards
    ranks: str = choice("rank0", ("rank0", "all"))  # which ranks share the shards (whole shards per rank)
    batch_size: int = at_least(16, 1)
    prompt: str = image_prompt(CAPTION_PROMPT)
    max_new_tokens: int = at_least(32, 1)
    do_sample: bool = False
    temperature: float = positive(1.0)
    top_p: float = unit_interval(1.0)
    num_beams: int = at_least(1, 1)
    dtype: str = choice("float32", ("float32", "bfloat16", "float16", "auto"))
    # "": this rank's device; "auto": accelerate spreads/offloads a large model
    device_map: str = choice("", ("", "auto"))
    # an image over either bound is skipped and listed in the manifest
    max_image_pixels: int = _max_image_pixels()
    max_image_aspect_ratio: float = _max_image_aspect_ratio()


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The DeepSpeed engine of stage 1b, turned into a DeepSpeed config dict."""

    zero_stage: int = checked(0, lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3")
    # fp16 is refused where DeepSpeed lacks it, e.g. the CPU
    precision: str = choice("fp32", ("fp32", "bf16", "fp16"))
    gradient_accumulation_steps: int = at_least(1, 1)
    optimizer: str = choice("AdamW", ("Adam", "AdamW", "SGD"))
    lr: float = positive(1e-3)
    weight_decay: float = non_negative(0.0)
    scheduler: str = choice("WarmupCosineLR", ("none", "WarmupLR", "WarmupCosineLR"))
    warmup_steps: int = at_least(0, 0)
    gradient_clipping: float = non_negative(1.0, "a number >= 0 (0: off)")
    # A DeepSpeed JSON of your own (offload, ZeRO-3 options, ...) merged under the keys set here, which win.
    config_file: str = path_setting("")
    # CPU ranks all-reduce through gloo ("shm": DeepSpeed's shared-memory op, JIT-compiled on first use).
    cpu_comm: str = choice("gloo", ("gloo", "shm"))


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1b: Dynamic Weighted Pretraining of the FL backbone against the frozen MLLM."""

    model: str = path_setting("")  # the MLLM; "" means annotate.model
    shards: str = path_setting("")  # annotated shards; "" means this run's <run dir>/annotate/ directory
    # all: every rank is a DeepSpeed data-parallel rank; rank0 only with one process (DeepSpeed's
    # checkpointing barriers on the whole group, so idle ranks cannot wait elsewhere)
    ranks: str = choice("all", ("rank0", "all"))
    steps: int = at_least(200, 1)
    micro_batch_size: int = at_least(8, 1)
    # Samples per optimizer step over all ranks. 0: micro_batch_size x deepspeed.gradient_accumulation_steps x
    # the number of ranks, so the batch (and the backbone) changes with the number of processes. A number
    # fixes it: the accumulation steps become global_batch_size / (micro_batch_size x ranks), so DWP takes the
    # same steps over the same batches on every number of ranks that divides global_batch_size / micro_batch_size
    # (the same weights; BatchNorm's running estimates are rank 0's); any other number is refused.
    global_batch_size: int = at_least(0, 0)
    alpha_start: float = checked(0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    # from alpha_start to 1 over ramp_fraction of the steps
    alpha_schedule: str = choice("linear", ("linear", "cosine"))
    ramp_fraction: float = unit_interval(0.5)
    prompt: str = image_prompt(CAPTION_PROMPT)
    max_caption_tokens: int = at_least(32, 1)
    heldout: int = at_least(32, 1)  # captioned images kept out of training for the held-out losses
    checkpoint_every: int = at_least(50, 1)  # DeepSpeed checkpoints (resume) every this many steps
    # a captioned image over either bound is skipped and counted in metrics.json
    max_image_pixels: int = _max_image_pixels()
    max_image_aspect_ratio: float = _max_image_aspect_ratio()
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass(frozen=True)
class AlignConfig:
    """Stage 3: global alignment of the aggregated model on a small class-balanced set, on rank 0."""

    every: int = at_least(0, 0)  # rounds between alignments; 0 turns alignment off
    # pool: labeled shards held by the server | holdout: data.server_holdout_per_class images per class kept
    # back from the training split | web: unlabeled shards pseudo-labeled by the teacher
    source: str = choice("pool", ("pool", "holdout", "web"))
    pool_shards: str = path_setting("")  # labeled shards of the pool (e.g. shards/fmnist_align/*.tar.gz)
    web_shards: str = path_setting("")  # unlabeled shards for source = "web"
    per_class: int = at_least(20, 1)  # k images per class
    # uniform: q = 1/C for every image at the same beta (label smoothing), the control that separates "more
    # alignment" from the MLLM's knowledge; it needs no model
    teacher: str = choice("none", ("none", "llava", "clip", "uniform"))
    teacher_model: str = path_setting("")  # llava: hub id or directory; clip: open_clip name or local-dir:DIR
    clip_pretrained: str = path_setting("")  # open_clip pretrained tag for a named architecture (e.g. openai)
    prompt: str = image_prompt(CLASS_QUESTION_PROMPT)  # llava teacher's question
    templates: str = "a photo of a {}."  # clip teacher's prompt templates, separated by '|'
    # clip teacher's logits are scale * cos(image, text): 0 takes the model's own learned scale (exp of its
    # logit_scale; OpenAI's CLIP: 100), a number > 0 overrides it
    clip_logit_scale: float = non_negative(0.0, "0 (the CLIP model's own learned scale) or a number > 0")
    teacher_temperature: float = positive(1.0)  # softmax temperature of the teacher's class scores
    # llava teacher: a class's score is the sum (sequence log-likelihood) or the mean (length-normalised)
    # of its answer tokens' log-probabilities; with the trained stand-in "sum" was more accurate on
    # shards/fmnist_align (0.780 against 0.685)
    teacher_score: str = choice("sum", ("sum", "mean"))
    steps: int = at_least(20, 1)
    lr: float = positive(0.01)
    batch_size: int = at_least(64, 1)
    beta: float = non_negative(1.0)
    # T of the distillation term: 1 gives the paper's CE(y, p) + beta * KL(q || p); otherwise both sides are
    # tempered as in standard distillation, beta * T^2 * KL(q_T || p_T), q_T proportional to q^(1/T).
    temperature: float = positive(1.0)
    train: str = choice("classifier", ("classifier", "all"))
    # web: an image over either bound is skipped and counted; pool: refused, naming the shard and member
    max_image_pixels: int = _max_image_pixels()
    max_image_aspect_ratio: float = _max_image_aspect_ratio()


@dataclass(frozen=True)
class DpConfig:
    """Central differential privacy, DP-FedAvg (McMahan et al., ICLR 2018): mllmfl_dist/fl/dp.py."""

    enabled: bool = False
    clip_norm: float = positive(1.0)  # C: L2 bound of each client's whole state update
    noise_multiplier: float = non_negative(1.0)  # z: noise std on the summed updates is z * C
    # > 0: derive z so that epsilon after federated.rounds rounds is at most this (noise_multiplier is ignored)
    target_epsilon: float = non_negative(0.0, "a number >= 0 (0: use dp.noise_multiplier)")
    delta: float = checked(1e-5, lambda v: 0 < v < 1, "a number in (0, 1)")
    accountant: str = choice("rdp", ("rdp", "pld"))


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    # The sections the known strategies read ({"creff": CreffOptions(...), ...}), defaults where the file
    # has none; in the TOML and in to_dict() they are sections like the others.
    strategy_sections: Mapping[str, Any] = field(default_factory=lambda: default_strategy_sections())

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    @property
    def paths(self) -> RunLayout:
        """Where this run's files go (:mod:`mllmfl_dist.core.layout`)."""
        return RunLayout(self.run_dir)

    def section(self, name: str) -> Any:
        """A strategy's section (``cfg.section("creff")``); ConfigError when no known strategy declares it."""
        try:
            return self.strategy_sections[name]
        except KeyError:
            raise ConfigError(
                f"no strategy declares a config section [{name}]; known: {', '.join(self.strategy_sections) or 'none'}"
            ) from None

    def with_section(self, name: str, value: Any) -> Config:
        return dataclasses.replace(self, strategy_sections={**self.strategy_sections, name: value})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every section as a plain dict, the strategies' sections after ``federated`` (the TOML's order)."""
        out: dict[str, dict[str, Any]] = {}
        for spec in dataclasses.fields(self):
            if spec.name == "strategy_sections":
                continue
            out[spec.name] = dataclasses.asdict(getattr(self, spec.name))
            if spec.name == "federated":
                out.update({name: dataclasses.asdict(value) for name, value in self.strategy_sections.items()})
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


CORE_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "strategy_sections")
assert set(CORE_SECTIONS) == plugins.RESERVED_SECTIONS, "config/plugins.py must reserve the run's own sections"


def default_strategy_sections() -> dict[str, Any]:
    """The sections of every known strategy at their defaults."""
    return {name: options() for name, options in plugins.strategy_sections().items()}
