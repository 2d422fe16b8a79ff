"""What the MLLM stand-ins know, measured through the project's own loading and inference paths.

`measure_standins(clip_dir, llava_dir, test_shards, class_names, ...)` -> a dict of three accuracies on
labeled test shards (the shipped balanced Fashion-MNIST test set, `shards/fmnist_lt/test-*.tar.gz`):

- `clip_zero_shot_acc`: the CLIP teacher's zero-shot prediction (`teachers.clip_teacher_logits`, the
  templates of `align.templates`), loaded with `clip_teacher.load_clip("local-dir:...")`;
- `llava_caption_acc`: the fraction of LLaVA captions (`captioning.caption_batch`, the annotation
  stage's defaults: greedy, `annotate.prompt`) whose named category (`web_captions.named_category`) is the
  image's class; a caption naming no category counts as wrong;
- `llava_teacher_acc`: the accuracy of the argmax of the LLaVA teacher's class scores as alignment reads them
  (`teachers.llava_answer_loglik`, `align.prompt`), for the summed (`sum`) and the length-normalised
  (`mean`) score; `llava_teacher_acc` is that of the score `align.teacher_score` names by default.

Every model is loaded from its directory as a stage would load it, so a test can recompute a saved card from
the saved weights. The numbers are fractions in [0, 1] of `n_images` images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from mllmfl_dist.config import AlignConfig, AnnotateConfig
from mllmfl_dist.data.labeled_shards import resolve_pattern
from mllmfl_dist.data.images import to_pil
from mllmfl_dist.data.shards import read_labeled_shards
from mllmfl_dist.standins.web_captions import named_category
from mllmfl_dist.mllm.clip_teacher import load_clip
from mllmfl_dist.mllm.llava import load_llava
from mllmfl_dist.mllm.teachers import clip_teacher_logits, llava_answer_loglik
from mllmfl_dist.mllm.captioning import Generation, caption_batch

__all__ = ["select_per_class", "measure_standins"]


def select_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Indices of the first `per_class` images of each class, in data order (all when None)."""
    if per_class is None:
        return torch.arange(len(labels))
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        keep[torch.nonzero(labels == c).flatten()[:per_class]] = True
    return torch.nonzero(keep).flatten()


@torch.no_grad()
def measure_standins(
    clip_dir: str | Path,
    llava_dir: str | Path,
    test_shards: str,
    class_names: Sequence[str],
    *,
    per_class: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """The three accuracies (see the module docstring) on the labeled `test_shards` (a pattern; relative ones
    are also looked up from the repository root), classes named by `class_names` (index = label).
    `per_class` measures the first `per_class` images of each class only. Raises DataError for missing or
    damaged shards and ModelLoadError for a model that does not load."""
    from tqdm import tqdm

    images, labels, _ = read_labeled_shards(resolve_pattern(test_shards, "test shards"))
    keep = select_per_class(labels, per_class)
    labels = labels[keep]
    pil = [to_pil(images[i]).convert("RGB") for i in keep.tolist()]
    align, annotate = AlignConfig(), AnnotateConfig()

    clip, preprocess, tokenizer = load_clip(f"local-dir:{clip_dir}")
    logits = clip_teacher_logits(
        clip, preprocess, tokenizer, pil, list(class_names), align.templates, batch_size=batch_size
    )
    clip_acc = float((logits.argmax(1) == labels).float().mean())
    del clip

    llava, processor = load_llava(str(llava_dir))
    generation = Generation.from_config(annotate)
    captions: list[str] = []
    for start in tqdm(range(0, len(pil), batch_size), desc="model card: captions", disable=not progress):
        captions += caption_batch(llava, processor, pil[start : start + batch_size], generation)
    named = torch.tensor([-1 if (c := named_category(t)) is None else c for t in captions])
    caption_acc = float((named == labels).float().mean())

    scores = {}
    for score in ("sum", "mean"):
        s = llava_answer_loglik(
            llava, processor, pil, list(class_names), align.prompt, batch_size=batch_size * 4, score=score
        )
        scores[score] = float((s.argmax(1) == labels).float().mean())
    return {
        "test_shards": test_shards,
        "n_images": len(pil),
        "class_names": list(class_names),
        "clip_zero_shot_acc": clip_acc,
        "clip_templates": align.templates,
        "llava_caption_acc": caption_acc,
        "llava_caption_prompt": annotate.prompt,
        "llava_caption_no_class": float((named == -1).float().mean()),
        "llava_caption_examples": captions[:: max(1, len(captions) // 10)][:10],
        "llava_teacher_acc": scores[align.teacher_score],
        "llava_teacher_score": align.teacher_score,
        "llava_teacher_acc_by_score": scores,
        "llava_teacher_prompt": align.prompt,
    }
