"""The CLIP teacher (open_clip): zero-shot class distributions from prompt templates.

Used by the CLIP2FL baseline and as an alternative teacher for global alignment. Models load through
`open_clip.create_model_and_transforms`: a built-in name plus a pretrained tag (`ViT-L-14-336`,
`pretrained="openai"`; needs network or the cache), `hf-hub:org/repo`, or `local-dir:DIR` (a directory with
`open_clip_config.json` and a weights file, such as `<dir>/clip` from `build_tiny_models`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mllmfl_dist.mllm.llava import ModelLoadError, _first_line, unloadable_weights

__all__ = [
    "ModelLoadError",
    "load_clip",
    "clip_embed_dim",
    "resolve_logit_scale",
    "zero_shot_classifier",
    "zero_shot_logits",
    "DEFAULT_TEMPLATES",
]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
LOCAL_DIR = "local-dir:"

_HINT = (
    "downloads need network access or the weights already in the cache (HF_HOME); or point the model at a "
    "local directory with 'local-dir:DIR' (e.g. DIR/clip from `python -m mllmfl_dist tiny-models DIR`)"
)


def load_clip(model: str, pretrained: str = "", *, device: torch.device | str = "cpu", precision: str = "fp32"):
    """Load an open_clip model: `(model, preprocess, tokenizer)`.

    model: a built-in architecture (`ViT-L-14-336`, with `pretrained` a tag such as `openai` or a checkpoint
        file), `hf-hub:org/repo`, or `local-dir:DIR` (`pretrained` is ignored for the last two, as in open_clip).
    preprocess: open_clip's evaluation transform (PIL image -> normalised tensor at the model's image size).
    tokenizer: `open_clip.get_tokenizer(model)` (list of strings -> `[N, context_length]` token ids).
    The model is in eval mode on `device`; `precision` is open_clip's (`fp32`, `fp16`, `bf16`, ...).
    Raises `ModelLoadError` (one line naming the model) when it cannot be found or downloaded.
    """
    import open_clip

    model = str(model)
    label = f"CLIP model {model!r}" + (f" (pretrained={pretrained!r})" if pretrained else "")
    if model.startswith(LOCAL_DIR):
        path = Path(model[len(LOCAL_DIR) :]).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{label}: local directory not found; {_HINT}")
        if not (path / "open_clip_config.json").is_file():
            raise ModelLoadError(f"{label}: the directory has no open_clip_config.json; {_HINT}")
    elif ":" not in model and open_clip.get_model_config(model.replace("/", "-")) is None:
        raise ModelLoadError(f"{label}: not an open_clip architecture (see open_clip.list_models()); {_HINT}")
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=device, precision=precision
        )
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as exc:  # noqa: BLE001 - unpickling, safetensors, zip and config errors share no base
        for folder in _local_weight_folders(model, pretrained):
            culprit = unloadable_weights(folder)
            if culprit:
                raise ModelLoadError(f"{label}: {culprit}; replace the file") from None
        raise ModelLoadError(f"{label} could not be loaded ({_first_line(exc)}); {_HINT}") from None
    clip.eval()
    return clip, preprocess, tokenizer


def _local_weight_folders(model: str, pretrained: str) -> list[Path]:
    """Folders whose weights files a failed load may have read (``local-dir:DIR``; ``pretrained`` a file)."""
    folders = []
    if model.startswith(LOCAL_DIR):
        folders.append(Path(model[len(LOCAL_DIR) :]).expanduser())
    if pretrained and Path(pretrained).expanduser().is_file():
        folders.append(Path(pretrained).expanduser().parent)
    return folders


def clip_embed_dim(model: str, pretrained: str = "") -> int:
    """The width of an open_clip model's joint embedding, read from its config where that needs no weights
    (`local-dir:DIR`, a built-in architecture); an `hf-hub:` model is loaded (from the cache) to find out."""
    import json

    import open_clip

    model = str(model)
    if model.startswith(LOCAL_DIR):
        path = Path(model[len(LOCAL_DIR) :]).expanduser() / "open_clip_config.json"
        if not path.is_file():
            raise ModelLoadError(f"CLIP model {model!r}: {path} not found; {_HINT}")
        try:
            return int(json.loads(path.read_text())["model_cfg"]["embed_dim"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"CLIP model {model!r}: {path} has no model_cfg.embed_dim ({exc})") from None
    if ":" not in model:
        config = open_clip.get_model_config(model.replace("/", "-"))
        if config is None:
            raise ModelLoadError(
                f"CLIP model {model!r}: not an open_clip architecture (see open_clip.list_models()); {_HINT}"
            )
        return int(config["embed_dim"])
    clip, _, tokenizer = load_clip(model, pretrained)
    try:
        with torch.no_grad():
            return int(clip.encode_text(tokenizer(["a photo"])).shape[-1])
    except Exception as exc:  # noqa: BLE001 - any model that cannot embed a text is unusable here
        raise ModelLoadError(
            f"CLIP model {model!r}: cannot embed a text to find its width ({_first_line(exc)})"
        ) from None


def resolve_logit_scale(model, setting: float = 0.0) -> float:
    """The scale of a CLIP teacher's logits ``scale * cos(image, text)``: ``setting`` when it is > 0, else the
    model's own learned scale, ``model.logit_scale.exp()`` (open_clip keeps its log). For OpenAI's CLIP the
    learned scale is 100 (the value CLIP2FL's released code uses, through that model); a CLIP trained here has
    its own, and its zero-shot distributions are calibrated at it, not at 100. Raises ModelLoadError when
    ``setting`` is 0 and the model has no learned scale."""
    if setting > 0:
        return float(setting)
    learned = getattr(model, "logit_scale", None)
    if not isinstance(learned, torch.Tensor):
        raise ModelLoadError(
            f"the CLIP model ({type(model).__name__}) has no learned logit_scale; set the "
            f"teacher's logit scale to a number > 0"
        )
    return float(learned.detach().float().exp().item())


@torch.no_grad()
def zero_shot_classifier(
    model,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    chunk: int = 512,
) -> torch.Tensor:
    """Class text embeddings `[C, D]`: each template filled with each class name, encoded, L2-normalised,
    averaged over the templates and normalised again (CLIP's zero-shot recipe). Compute once per class list
    and pass as `classifier=` to `zero_shot_logits`."""
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    prompts = [t.format(c) for c in class_names for t in templates]
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[start : start + chunk]).to(device)
        parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    text = torch.cat(parts).view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(text, dim=-1)


@torch.no_grad()
def zero_shot_logits(
    model,
    tokenizer,
    images_preprocessed: torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    logit_scale: float = 100.0,
    *,
    classifier: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-shot logits `[B, C]` (float32): `logit_scale * normalise(encode_image(x)) @ text_embeddings.T`,
    with the text embeddings from `zero_shot_classifier` (or `classifier`, precomputed). `softmax(logits / T)`
    is the teacher's class distribution. `images_preprocessed` is `[B, 3, H, W]` from the `preprocess`
    returned by `load_clip`; it is moved to the model's device and dtype."""
    if classifier is None:
        classifier = zero_shot_classifier(model, tokenizer, class_names, templates)
    elif classifier.shape[0] != len(class_names):
        raise ValueError(f"classifier has {classifier.shape[0]} classes, class_names {len(class_names)}")
    param = next(model.visual.parameters())
    images = images_preprocessed.to(device=param.device, dtype=param.dtype)
    image = F.normalize(model.encode_image(images).float(), dim=-1)
    return logit_scale * image @ classifier.to(image.device).T
