"""Teacher class distributions `q` for global alignment (DESIGN.md stage 3), cached on disk.

`teacher_distributions(kind, images, class_names, ...)` -> `q`, float32 `[N, C]`, rows summing to 1:

- `kind="llava"`: the score of class c for an image is the log-likelihood, under the LLaVA, of the answer
  `" " + class_name` to `prompt` (which holds `<image>`): with `score="sum"` the SUM of the log-probabilities
  of the answer tokens given the image and the prompt (a proper sequence log-likelihood, which penalises names
  of many tokens); with `score="mean"` their MEAN (the length-normalised log-likelihood, as in the
  length-normalised scoring of multiple-choice answers, e.g. Brown et al. 2020, GPT-3, Sec. 2.4).
  `q = softmax(scores / temperature)`.
  The answer tokens are the suffix of `processor(prompt + " " + name)` after the tokens it shares with
  `processor(prompt)` (with byte-level BPE or sentencepiece the prompt's tokens are normally a prefix; if a
  tokenizer merges across the boundary, the answer starts at the first differing token, so the score is the
  likelihood of everything after the common prefix).
- `kind="clip"`: open_clip zero-shot logits `scale * cos(image, text)` (prompt `templates`; `scale` the
  model's own learned logit scale, or `logit_scale` when that is > 0), `q = softmax(logits / temperature)`.
- `kind="none"` is not a teacher: it means plain cross-entropy, and the caller does not ask for `q`
  (`teacher_distributions` raises ValueError for it, as for any other unknown kind).

Cache: `q` is computed once per alignment set and stored as `<cache_dir>/teacher-<kind>-<key16>.pt`
(written atomically, read back with `weights_only=True`); the key is a sha256 over the kind, the model, the
pretrained tag, the prompt, the llava score, the templates, the clip logit scale setting (0, "the model's own",
is fixed by the weights, which the key names), the temperature, the class names, the size and
modification time of the model's weights files when it is a local directory, and every image's mode, size and
pixel bytes. A hit returns the stored tensor (and the scale the clip teacher resolved, stored beside it) without
loading any model. `cache_dir=None` disables it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mllmfl_dist.core import checkpoint
from mllmfl_dist.config import ConfigError
from mllmfl_dist.mllm.clip_teacher import load_clip, resolve_logit_scale, zero_shot_classifier, zero_shot_logits
from mllmfl_dist.mllm.llava import load_llava, weights_identity

__all__ = [
    "TEACHER_KINDS",
    "LLAVA_SCORES",
    "teacher_distributions",
    "teacher_cache_key",
    "teacher_cache_path",
    "llava_answer_loglik",
    "llava_answer_sequences",
    "clip_teacher_logits",
]

log = logging.getLogger(__name__)

TEACHER_KINDS = ("llava", "clip")
LLAVA_SCORES = ("sum", "mean")
DEFAULT_PROMPT = "USER: <image>\nWhat is the object in the image? ASSISTANT:"
_CACHE_VERSION = 1  # bump when the scores' definition changes, so old cache files are not reused


def _templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Templates as a tuple; a single string is `|`-separated (as `align.templates` in the config)."""
    if isinstance(templates, str):
        templates = templates.split("|")
    out = tuple(t.strip() for t in templates if t.strip())
    if not out:
        raise ValueError("templates is empty")
    return out


def teacher_cache_key(
    kind: str,
    images: Sequence,
    class_names: Sequence[str],
    *,
    model: str = "",
    clip_pretrained: str = "",
    prompt: str = DEFAULT_PROMPT,
    templates: str | Sequence[str] = ("a photo of a {}.",),
    temperature: float = 1.0,
    score: str = "sum",
    logit_scale: float = 0.0,
) -> str:
    """sha256 (hex) identifying a teacher computation: its settings, the class names and the images' bytes.
    Only the settings the kind uses enter it (the prompt and score for llava; the templates and tag for clip)."""
    meta = {
        "version": _CACHE_VERSION,
        "kind": kind,
        "model": str(model),
        "clip_pretrained": clip_pretrained if kind == "clip" else "",
        "prompt": prompt if kind == "llava" else "",
        "score": score if kind == "llava" else "",
        "templates": list(_templates(templates)) if kind == "clip" else [],
        "temperature": float(temperature),
        "class_names": [str(c) for c in class_names],
        "n_images": len(images),
        # weights replaced in place (same directory name) must not reuse the old teacher's q
        "weights": weights_identity(str(model), clip_pretrained if kind == "clip" else ""),
        # clip only: a key the llava teacher's did not have would orphan every cached llava pass
        **({"logit_scale": float(logit_scale)} if kind == "clip" else {}),
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for image in images:
        digest.update(f"|{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def teacher_cache_path(cache_dir: str | Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / f"teacher-{kind}-{key[:16]}.pt"


def _rgb(image):
    return image if image.mode == "RGB" else image.convert("RGB")


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def llava_answer_sequences(processor, reference_image, class_names: Sequence[str], prompt: str):
    """Token ids of `prompt + " " + name` for each class, and where its answer starts.

    Returns a list of `(ids, start)`: `ids` the 1-D input ids the processor makes (with `<image>` expanded
    to the visual tokens, which needs an image: `reference_image`; the token count does not depend on which
    image for LLaVA-1.5's fixed-size processor), `start` the index of the first answer token (the length of
    the prefix shared with the prompt's own ids)."""
    ref = _rgb(reference_image)
    prompt_ids = processor(images=[ref], text=[prompt], return_tensors="pt")["input_ids"][0]
    out = []
    for name in class_names:
        ids = processor(images=[ref], text=[prompt + " " + str(name)], return_tensors="pt")["input_ids"][0]
        start = _common_prefix(prompt_ids, ids)
        if start >= len(ids):
            raise ValueError(f"class name {name!r} adds no tokens after the prompt")
        if start == 0:
            raise ValueError("the prompt has no tokens")
        out.append((ids, start))
    return out


@torch.no_grad()
def llava_answer_loglik(
    llava,
    processor,
    images: Sequence,
    class_names: Sequence[str],
    prompt: str = DEFAULT_PROMPT,
    *,
    batch_size: int = 16,
    score: str = "sum",
) -> torch.Tensor:
    """`[N, C]` float32: `sum_t log p(answer_t | image, prompt, answer_<t)` for the answer `" " + name`
    (`score="sum"`), or that sum divided by the answer's token count (`score="mean"`); other values raise
    ValueError.

    Batched: the C answer sequences are left-padded to one length (attention mask 0 on the padding, position
    ids counted from the first real token, so each row equals its unpadded forward), and each image's pixels
    are repeated for its C rows; a forward holds about `batch_size` rows (at least one image x all classes,
    or a chunk of the classes when C > batch_size). Only the logits of the last `max answer length + 1`
    positions are computed (`logits_to_keep`)."""
    if not images or not class_names:
        raise ValueError("images and class_names must be non-empty")
    if score not in LLAVA_SCORES:
        raise ValueError(f"score must be one of {list(LLAVA_SCORES)}, got {score!r}")
    seqs = llava_answer_sequences(processor, images[0], class_names, prompt)
    num_classes = len(seqs)
    length = max(len(ids) for ids, _ in seqs)
    keep = max(len(ids) - start for ids, start in seqs) + 1
    pad_id = processor.tokenizer.pad_token_id
    input_ids = torch.full((num_classes, length), pad_id, dtype=torch.long)
    attention = torch.zeros((num_classes, length), dtype=torch.long)
    answer_mask = torch.zeros((num_classes, length), dtype=torch.bool)
    for c, (ids, start) in enumerate(seqs):
        offset = length - len(ids)
        input_ids[c, offset:] = ids
        attention[c, offset:] = 1
        answer_mask[c, offset + start :] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    # Targets of the kept logits: kept position j (absolute length-keep+j) predicts token length-keep+j+1.
    targets = input_ids[:, length - keep + 1 :]
    target_mask = answer_mask[:, length - keep + 1 :]

    param = next(llava.parameters())
    device, dtype = param.device, param.dtype
    per_forward = max(1, int(batch_size))
    images_per = max(1, per_forward // num_classes)
    classes_per = min(num_classes, per_forward)
    scores = torch.empty((len(images), num_classes), dtype=torch.float32)
    for i0 in range(0, len(images), images_per):
        chunk = [_rgb(im) for im in images[i0 : i0 + images_per]]
        pixels = processor.image_processor(chunk, return_tensors="pt")["pixel_values"]
        b = len(chunk)
        for c0 in range(0, num_classes, classes_per):
            cs = slice(c0, min(num_classes, c0 + classes_per))
            k = cs.stop - cs.start
            out = llava(
                input_ids=input_ids[cs].repeat(b, 1).to(device),
                attention_mask=attention[cs].repeat(b, 1).to(device),
                position_ids=positions[cs].repeat(b, 1).to(device),
                pixel_values=pixels.repeat_interleave(k, dim=0).to(device=device, dtype=dtype),
                logits_to_keep=keep,
                use_cache=False,
            )
            logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            tgt = targets[cs].repeat(b, 1).to(logp.device)
            msk = target_mask[cs].repeat(b, 1).to(logp.device)
            tok = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).masked_fill(~msk, 0.0)
            total = tok.sum(-1)
            if score == "mean":
                total = total / msk.sum(-1)
            scores[i0 : i0 + b, cs] = total.view(b, k).cpu()
    return scores


@torch.no_grad()
def clip_teacher_logits(
    clip,
    preprocess,
    tokenizer,
    images: Sequence,
    class_names: Sequence[str],
    templates: str | Sequence[str] = ("a photo of a {}.",),
    *,
    batch_size: int = 16,
    logit_scale: float = 100.0,
    classifier: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[N, C]` float32 open_clip zero-shot logits (the text classifier computed once, or `classifier`)."""
    if not images or not class_names:
        raise ValueError("images and class_names must be non-empty")
    templates = _templates(templates)
    if classifier is None:
        classifier = zero_shot_classifier(clip, tokenizer, class_names, templates)
    parts = []
    step = max(1, int(batch_size))
    for i0 in range(0, len(images), step):
        x = torch.stack([preprocess(_rgb(im)) for im in images[i0 : i0 + step]])
        parts.append(
            zero_shot_logits(clip, tokenizer, x, class_names, templates, logit_scale, classifier=classifier)
            .float()
            .cpu()
        )
    return torch.cat(parts)


def teacher_distributions(
    kind: str,
    images: Sequence,
    class_names: Sequence[str],
    *,
    model: str = "",
    clip_pretrained: str = "",
    prompt: str = DEFAULT_PROMPT,
    templates: str | Sequence[str] = ("a photo of a {}.",),
    temperature: float = 1.0,
    score: str = "sum",
    logit_scale: float = 0.0,
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    details: dict | None = None,
) -> torch.Tensor:
    """The teacher's class distributions `q` (float32 `[N, C]`, rows sum to 1) for PIL `images`.

    kind: `llava` (answer log-likelihoods, see the module docstring) or `clip` (zero-shot logits). `none`
        (no teacher: plain cross-entropy) is the caller's business and raises ValueError here, as does any
        other kind.
    model: `align.teacher_model` (LLaVA hub id / directory; open_clip name, `hf-hub:` or `local-dir:DIR`);
        empty raises ConfigError naming `align.teacher_model`.
    clip_pretrained / templates (a sequence, or one `|`-separated string): clip only. prompt: llava only
        (must contain `<image>`). score: llava only, `sum` or `mean` of the answer tokens' log-probabilities
        (`align.teacher_score`; see the module docstring).
    temperature: `q = softmax(scores / temperature)`, > 0.
    logit_scale: clip only, the scale of its logits; 0 (`align.clip_logit_scale`'s default) takes the model's
        own learned scale (:func:`~mllmfl_dist.mllm.clip_teacher.resolve_logit_scale`).
    cache_dir: where `teacher-<kind>-<key16>.pt` is kept; a hit returns it without loading a model. None: no
        cache.
    device / batch_size: where the teacher runs and about how many sequences (llava) or images (clip) one
        forward holds.
    details: when given, receives what the teacher resolved: ``details["logit_scale"]`` (clip).
    """
    if kind not in TEACHER_KINDS:
        raise ValueError(
            f"teacher kind must be one of {list(TEACHER_KINDS)}, got {kind!r} "
            f"('none' means plain cross-entropy; the caller asks for no teacher then)"
        )
    if not str(model).strip():
        needs = "a LLaVA hub id or directory" if kind == "llava" else "an open_clip name or local-dir:DIR"
        raise ConfigError(f"align.teacher_model is empty; the {kind} teacher needs a model ({needs})")
    if not images:
        raise ValueError("images is empty")
    if not class_names:
        raise ValueError("class_names is empty")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "llava" and score not in LLAVA_SCORES:
        raise ValueError(f"the llava teacher's score must be one of {list(LLAVA_SCORES)}, got {score!r}")
    if kind == "llava" and "<image>" not in prompt:
        raise ValueError(f"the llava teacher's prompt must contain <image>: {prompt!r}")
    images = list(images)
    class_names = [str(c) for c in class_names]
    templates = _templates(templates)

    path = None
    if cache_dir is not None:
        key = teacher_cache_key(
            kind,
            images,
            class_names,
            model=model,
            clip_pretrained=clip_pretrained,
            prompt=prompt,
            templates=templates,
            temperature=temperature,
            score=score,
            logit_scale=logit_scale,
        )
        path = teacher_cache_path(cache_dir, kind, key)
        if path.is_file():
            try:
                stored = checkpoint.load(path)
                q = stored.get("q") if isinstance(stored, dict) else None
                if (
                    isinstance(q, torch.Tensor)
                    and stored.get("key") == key
                    and tuple(q.shape) == (len(images), len(class_names))
                ):
                    if details is not None and stored.get("logit_scale") is not None:
                        details["logit_scale"] = float(stored["logit_scale"])
                    return q.float()
                log.warning("teacher cache %s does not match this alignment set; recomputing", path)
            except Exception as err:  # noqa: BLE001 - a torn or foreign file: recompute and overwrite
                log.warning("teacher cache %s unreadable (%s); recomputing", path, type(err).__name__)

    scale = None
    if kind == "llava":
        llava, processor = load_llava(str(model), device=device)
        scores = llava_answer_loglik(llava, processor, images, class_names, prompt, batch_size=batch_size, score=score)
        del llava
    else:
        clip, preprocess, tokenizer = load_clip(str(model), clip_pretrained, device=device)
        scale = resolve_logit_scale(clip, logit_scale)
        log.info("clip teacher: logit scale %.4g (%s)", scale, "set" if logit_scale > 0 else "the model's own")
        scores = clip_teacher_logits(
            clip, preprocess, tokenizer, images, class_names, templates, batch_size=batch_size, logit_scale=scale
        )
        del clip
    q = torch.softmax(scores.float() / float(temperature), dim=-1).contiguous()
    if details is not None and scale is not None:
        details["logit_scale"] = scale

    if path is not None:
        checkpoint.save_atomic(
            {"q": q, "key": key, "kind": kind, "class_names": class_names, "logit_scale": scale}, path
        )
    return q
