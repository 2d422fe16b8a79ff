"""Stage 3: global alignment of the aggregated model on rank 0, under the MLLM teacher's supervision.

After the server step, every ``align.every`` rounds, rank 0 refines the global model on a small
class-balanced set (k images per class) with the paper's ``L = CE(y, p) + beta * KL(q || p)``, where ``p``
is the model's softmax and ``q`` the teacher's class distribution (``teacher = "none"``: plain
cross-entropy on the balanced set; ``"uniform"``: ``q = 1/C``, label smoothing at the same beta, the control
that tells more alignment from the teacher's knowledge); with ``align.temperature`` T != 1 both are tempered
(``beta * T^2 * KL(q_T || p_T)``, see :func:`alignment_loss`). The round loop then broadcasts the aligned model
as its one flat buffer, so every rank starts the next round from it. BatchNorm statistics stay frozen during
alignment (the set is tiny); ``train = "classifier"`` updates the linear head only, ``"all"`` the whole
model. Clients never see the alignment set or the teacher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mllmfl_dist.config import AlignConfig, Config, ConfigError
from mllmfl_dist.data import ClientData, normalize
from mllmfl_dist.core.seeds import TAG_ALIGN, derive_seed
from mllmfl_dist.data.images import ImageBounds, UnusableImageError, decode_image, model_input, to_pil
from mllmfl_dist.data.shards import expand_shards, iter_samples, read_labeled_shards
from mllmfl_dist.fl.losses import distillation_loss, temper
from mllmfl_dist.mllm.teacher_diagnostics import teacher_diagnostics
from mllmfl_dist.mllm.teachers import teacher_distributions

log = logging.getLogger(__name__)

# The largest input side of the teachers (LLaVA-1.5's 336 px; CLIP ViT-B/L take 224): web images are decoded
# no larger than twice it (or twice the FL model's side), since all of them are held for the teacher at once.
TEACHER_SIDE = 336


@dataclass
class AlignmentSet:
    images: torch.Tensor  # uint8 [N, C, H, W] at the FL model's size and channels
    labels: torch.Tensor  # int64 [N]
    teacher: torch.Tensor | None  # float32 [N, num_classes] rows summing to 1, or None (teacher "none")
    short_classes: list[int]  # classes with fewer than k images
    labeled: bool = True  # labels are the server's own (pool, holdout); False: the teacher's pseudo-labels (web)
    skipped: int = 0  # web samples not used: unreadable, over align.max_image_*, or members outside any sample
    teacher_logit_scale: float | None = None  # the clip teacher's resolved logit scale

    def describe(self, acfg: AlignConfig) -> dict[str, Any]:
        """What the alignment set is, for summaries and the compare table: its size, how many of its images
        carry server-held labels, the teacher, and the teacher's accuracy against those labels (the fraction
        of images whose argmax of q is the label; None without a teacher or without labels), its mean entropy
        (nats) and mean top probability on the set (:func:`teacher_diagnostics`), and the clip teacher's logit
        scale."""
        stats = {}
        if self.teacher is not None:
            stats = teacher_diagnostics(self.teacher, self.labels if self.labeled else None)
        return {
            "source": acfg.source,
            "teacher": acfg.teacher,
            "teacher_model": acfg.teacher_model,
            "images": int(self.labels.shape[0]),
            "server_labeled_images": int(self.labels.shape[0]) if self.labeled else 0,
            "short_classes": list(self.short_classes),
            "teacher_accuracy": stats.get("accuracy"),
            "teacher_mean_entropy_nats": stats.get("mean_entropy_nats"),
            "teacher_max_entropy_nats": stats.get("max_entropy_nats"),
            "teacher_mean_top_probability": stats.get("mean_top_probability"),
            "teacher_logit_scale": self.teacher_logit_scale,
            "skipped_images": self.skipped,
        }


def alignment_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, beta: float, temperature: float
) -> torch.Tensor:
    """The paper's alignment loss ``CE(y, p) + beta * KL(q || p)`` at T = 1 (MLLM-LLaVA-FL, Eq. of stage 3);
    for T != 1 both sides are tempered as in standard distillation: ``CE(y, p) + beta * T^2 *
    KL(q_T || p_T)``, ``p_T = softmax(logits / T)``, ``q_T`` proportional to ``q^(1/T)``. Just the
    cross-entropy without a teacher. logits ``[B, C]``, teacher ``q`` ``[B, C]`` (rows summing to 1)."""
    tempered = temper(teacher, temperature) if teacher is not None else None
    return distillation_loss(logits, labels, tempered, beta, temperature)


def take_per_class(
    labels: np.ndarray, num_classes: int, k: int, score: np.ndarray | None = None
) -> tuple[np.ndarray, list[int]]:
    """Indices of k samples per class (the first k, or the k highest ``score``), and the short classes."""
    chosen, short = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if score is not None:
            members = members[np.argsort(-score[members], kind="stable")]
        if len(members) < k:
            short.append(c)
        chosen.append(members[:k])
    return np.sort(np.concatenate(chosen)), short


def align_model(
    model: nn.Module,
    data: AlignmentSet,
    acfg: AlignConfig,
    mean,
    std,
    *,
    seed: int,
    round_index: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``acfg.steps`` SGD steps of the alignment loss on ``model`` (in place); returns the mean loss."""
    params = list(model.classifier.parameters()) if acfg.train == "classifier" else list(model.parameters())
    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()  # BatchNorm statistics stay those of the federation
    optimizer = torch.optim.SGD(params, lr=acfg.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(derive_seed(seed, TAG_ALIGN, round_index))
    n = data.labels.shape[0]
    images = normalize(data.images.to(device), mean, std)
    labels = data.labels.to(device)
    teacher = data.teacher.to(device) if data.teacher is not None else None
    order, position, losses = torch.randperm(n, generator=generator), 0, []
    try:
        for _ in range(acfg.steps):
            if position >= n:
                order, position = torch.randperm(n, generator=generator), 0
            batch = order[position : position + acfg.batch_size]
            position += acfg.batch_size
            loss = alignment_loss(
                model(images[batch]),
                labels[batch],
                teacher[batch] if teacher is not None else None,
                acfg.beta,
                acfg.temperature,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return {"align_loss": sum(losses) / len(losses)}


def build_alignment_set(cfg: Config, data: ClientData, cache_dir, device: torch.device | str = "cpu") -> AlignmentSet:
    """k images per class from the labeled pool, or from web shards pseudo-labeled by the teacher; each image
    brought to the FL model's size and channels by the one rule of :func:`mllmfl_dist.data.images.fit_square`."""
    acfg = cfg.align
    size, channels = data.image_size, data.in_channels
    skipped = 0
    details: dict[str, Any] = {}  # what the teacher resolved (the clip teacher's logit scale)

    if acfg.source == "holdout":
        if not hasattr(data, "server_pool") or not len(data.server_pool()[1]):
            raise ConfigError(
                "align.source = 'holdout' needs data.server_holdout_per_class > 0 (and an array data source)"
            )
        images, labels = data.server_pool()
        keep, short = take_per_class(labels.numpy(), data.num_classes, acfg.per_class)
        pil = [to_pil(im) for im in images[keep]]
        labels = labels[keep]
        teacher = _teacher(cfg, pil, data, cache_dir, device, details)
    elif acfg.source == "pool":
        if not acfg.pool_shards:
            raise ConfigError(
                "align.pool_shards is empty; name the labeled server-held pool (e.g. "
                "shards/fmnist_align/*.tar.gz) or set align.source = 'web'"
            )
        images, labels, _ = read_labeled_shards(expand_shards(acfg.pool_shards), ImageBounds.of(acfg, "align"))
        if labels.max() >= data.num_classes:
            raise ConfigError(
                f"align.pool_shards has labels up to {int(labels.max())}; the task has {data.num_classes} classes"
            )
        pil = [to_pil(im) for im in images]
        keep, short = take_per_class(labels.numpy(), data.num_classes, acfg.per_class)
        pil = [pil[i] for i in keep]
        labels = labels[keep]
        teacher = _teacher(cfg, pil, data, cache_dir, device, details)
    else:
        if acfg.teacher in ("none", "uniform"):
            raise ConfigError(
                f"align.source = 'web' needs a teacher to pseudo-label the images (align.teacher = "
                f"'{acfg.teacher}' cannot); set align.teacher to llava or clip"
            )
        if not acfg.web_shards:
            raise ConfigError("align.web_shards is empty; name the unlabeled shards to pseudo-label")
        pil, skipped = _web_images(acfg, max(size, TEACHER_SIDE))
        q_all = _teacher(cfg, pil, data, cache_dir, device, details)
        pseudo = q_all.argmax(dim=1).numpy()
        keep, short = take_per_class(pseudo, data.num_classes, acfg.per_class, score=q_all.max(dim=1).values.numpy())
        pil = [pil[i] for i in keep]
        labels = torch.from_numpy(pseudo[keep]).long()
        teacher = q_all[keep]
    if short:
        log.warning("alignment set: classes %s have fewer than %d images", short, acfg.per_class)
    images = torch.stack([torch.from_numpy(model_input(im, size, channels)) for im in pil])
    return AlignmentSet(
        images,
        labels.long(),
        teacher,
        short,
        labeled=acfg.source != "web",
        skipped=skipped,
        teacher_logit_scale=details.get("logit_scale"),
    )


def _web_images(acfg: AlignConfig, side: int) -> tuple[list[Any], int]:
    """The decoded images of ``align.web_shards`` and how many samples were skipped (logged by shard and key)."""
    bounds = ImageBounds.of(acfg, "align")
    pil, skipped = [], []
    for shard in expand_shards(acfg.web_shards):
        for sample in iter_samples(shard):
            if sample.get("image_bytes") is None:
                skipped.append(f"{shard.name}:{sample['key']} ({sample.get('error') or 'no image member'})")
                continue
            try:
                pil.append(decode_image(sample["image_bytes"], bounds, side=side))
            except UnusableImageError as err:
                skipped.append(f"{shard.name}:{sample['key']} ({err})")
    if skipped:
        log.warning(
            "alignment set: %d web sample(s) skipped: %s%s",
            len(skipped),
            "; ".join(skipped[:5]),
            " ..." if len(skipped) > 5 else "",
        )
    return pil, len(skipped)


def _teacher(
    cfg: Config, pil: list[Any], data: ClientData, cache_dir, device, details: dict[str, Any]
) -> torch.Tensor | None:
    acfg = cfg.align
    if acfg.teacher == "none":
        return None
    if acfg.teacher == "uniform":
        return uniform_teacher(len(pil), data.num_classes)
    return teacher_distributions(
        acfg.teacher,
        [im.convert("RGB") for im in pil],
        data.class_names,
        model=acfg.teacher_model,
        clip_pretrained=acfg.clip_pretrained,
        prompt=acfg.prompt,
        templates=acfg.templates,
        temperature=acfg.teacher_temperature,
        score=acfg.teacher_score,
        logit_scale=acfg.clip_logit_scale,
        cache_dir=cache_dir,
        device=device,
        details=details,
    )


def uniform_teacher(images: int, num_classes: int) -> torch.Tensor:
    """``align.teacher = "uniform"``: ``q = 1/C`` for every image (``[images, C]`` float32), so the alignment
    loss is ``CE(y, p) + beta * T^2 * KL(u || p_T)``, label smoothing at the same beta: the control that gives
    alignment's extra term without any model's knowledge."""
    return torch.full((images, num_classes), 1.0 / num_classes)
