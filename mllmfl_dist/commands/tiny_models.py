"""``python -m mllmfl_dist tiny-models DIR [--train CORPUS]``: build the stand-in LLaVA and open_clip models
(random, or trained on a captioned corpus with a model card)."""

from __future__ import annotations

import json

import torch

from mllmfl_dist.core.launch import env_rank
from mllmfl_dist.stages.deepspeed_setup import cpu_accelerator_env
from mllmfl_dist.standins.standin_settings import StandinSettings
from mllmfl_dist.standins.build import MODEL_CARD, build_tiny_models


def run(args) -> int:
    # transformers may import DeepSpeed, which would guess the accelerator and warn about it.
    cpu_accelerator_env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank = env_rank()
    paths = build_tiny_models(
        args.directory, train=args.train, settings=StandinSettings(seed=args.seed), progress=rank == 0
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.train is not None:
        card = json.loads((paths["llava"].parent / MODEL_CARD).read_text())
        measured = card["measured"]
        print(
            f"model card: {paths['llava'].parent / MODEL_CARD}: CLIP zero-shot {measured['clip_zero_shot_acc']:.3f}, "
            f"LLaVA captions naming the class {measured['llava_caption_acc']:.3f}, LLaVA teacher "
            f"{measured['llava_teacher_acc']:.3f} ({measured['n_images']} test images); "
            f"trained in {card['train_seconds']:.0f} s"
        )
    return 0
