"""Contrastive training of the CLIP stand-in with open_clip's own model and loss, on a captioned corpus.

`train_clip(images, captions, config, ...)` -> an `open_clip.CLIP` trained with `open_clip.ClipLoss` (the
symmetric InfoNCE loss of Radford et al. 2021, as open_clip trains) on (image, caption) pairs: AdamW, a
linear warm-up over the first tenth of the steps then a cosine decay to 0, the learnable temperature clamped
at 100 as in CLIP, random horizontal flips. Images are preprocessed once with open_clip's own evaluation
transform, so training sees the pixels zero-shot evaluation sees. Deterministic for a given seed and
thread count. `save_open_clip(model, config, preprocess_cfg, out)` writes the `local-dir:` layout
(`open_clip_config.json` + `open_clip_model.safetensors`) that `open_clip.create_model_and_transforms` loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from mllmfl_dist.data.images import to_pil

__all__ = ["preprocess_images", "train_clip", "save_open_clip", "cosine_with_warmup"]


def cosine_with_warmup(step: int, steps: int, warmup: int) -> float:
    """The LR multiplier at `step` (0-based): linear from 1/warmup to 1 over `warmup` steps, then a half
    cosine from 1 down to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def preprocess_images(images: torch.Tensor, transform, batch: int = 512) -> torch.Tensor:
    """float32 `[N, 3, S, S]`: each uint8 `[C, H, W]` image as an RGB PIL image through `transform` (an
    open_clip preprocess)."""
    parts = []
    for start in range(0, len(images), batch):
        parts.append(torch.stack([transform(to_pil(im).convert("RGB")) for im in images[start : start + batch]]))
    return torch.cat(parts)


def train_clip(
    images: torch.Tensor,
    captions: Sequence[str],
    model_cfg: dict,
    preprocess_cfg: dict,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    progress: bool = True,
):
    """An `open_clip.CLIP(**model_cfg)` (seeded init) trained on `images` (uint8 `[N, C, H, W]`) and their
    `captions`. Returns `(model in eval mode, {"steps", "final_loss"})`. `preprocess_cfg` is open_clip's
    preprocess config (size, mean, std, interpolation, resize mode) the images are transformed with.
    Raises ValueError for mismatched lengths or a corpus smaller than one batch."""
    import open_clip

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(captions) < batch_size:
        raise ValueError(f"the corpus has {len(captions)} pairs, fewer than one batch of {batch_size}")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    transform = open_clip.image_transform(
        preprocess_cfg["size"],
        is_train=False,
        mean=preprocess_cfg["mean"],
        std=preprocess_cfg["std"],
        interpolation=preprocess_cfg["interpolation"],
        resize_mode=preprocess_cfg["resize_mode"],
    )
    pixels = preprocess_images(images, transform)
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    tokens = tokenizer(list(captions))
    loss_fn = open_clip.ClipLoss()
    # No weight decay on gains, biases, embeddings and the temperature, as open_clip's training script.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    per_epoch = len(captions) // batch_size
    steps = epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, steps, max(1, steps // 10)))
    generator = torch.Generator().manual_seed(seed)
    max_scale = math.log(100.0)
    model.train()
    loss = torch.tensor(float("nan"))
    with tqdm(total=steps, desc="CLIP (contrastive)", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(captions), generator=generator)
            for b in range(per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                flip = torch.rand(len(idx), generator=generator) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), pixels[idx].flip(-1), pixels[idx])
                image_features, text_features, scale = model(x, tokens[idx])
                loss = loss_fn(image_features, text_features, scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, max_scale)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval(), {"steps": steps, "final_loss": loss.item()}


def save_open_clip(model, model_cfg: dict, preprocess_cfg: dict, out: Path) -> None:
    """Write `out/open_clip_model.safetensors` and `out/open_clip_config.json` (model and preprocess
    config), the layout `open_clip.create_model_and_transforms("local-dir:out")` reads."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
