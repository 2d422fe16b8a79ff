"""The one loading path for the LLaVA MLLM, and the helpers the server stages read it through.

Every stage (annotation, Dynamic Weighted Pretraining, alignment) loads LLaVA with `load_llava`, from a hub id
such as `llava-hf/llava-1.5-7b-hf` or from a local directory; the tiny random model the tests and the offline
default use (`mllmfl_dist.standins.build.build_tiny_models`) is saved to disk and loaded back through this same
`from_pretrained` path.

- `load_llava(model, dtype=, device=, device_map=)` -> `(LlavaForConditionalGeneration, LlavaProcessor)`,
  the model in eval mode, the tokenizer padding on the left (batched generation).
- `vision_grid(model)` -> `(tokens_per_image, grid_h, grid_w, width)`: the visual-token layout LLaVA's
  projector reads, from the config (`vision_feature_layer`, `vision_feature_select_strategy`).
- `clip_visual_features(model, pixel_values)` -> `[B, tokens_per_image, width]`: the vision tower's features
  exactly as LLaVA feeds them to its projector (`g(x_clip)` in DWP).
- `project_visual_tokens(model, features)`: LLaVA's projector `W` applied to such features.
- `llava_forward_with_visual_features(llava, features, input_ids, attention_mask, labels)`: LLaVA's forward with
  such features in place of what its vision tower computes (DWP's mixed tokens, the stand-ins' training).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mllmfl_dist.core.errors import ModelLoadError
from mllmfl_dist.mllm.model_files import looks_like_local_path
from mllmfl_dist.core.checkpoint import unreadable_reason

__all__ = [
    "ModelLoadError",
    "load_llava",
    "vision_grid",
    "clip_visual_features",
    "project_visual_tokens",
    "IGNORE_INDEX",
    "llava_forward_with_visual_features",
    "visual_inputs_embeds",
    "llava_inner",
    "looks_like_local_path",
]

IGNORE_INDEX = -100  # label of positions without loss (prompt, image tokens, padding)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

_HINT = (
    "hub downloads need network access or the files already in the Hugging Face cache (HF_HOME); "
    "or point the model at a local directory (e.g. one made by `python -m mllmfl_dist tiny-models DIR`)"
)


def _first_line(exc: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, shortened to `limit` characters, for one-line error messages."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def load_llava(
    model: str,
    *,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    device_map: str = "",
    trust_remote_code: bool = False,
):
    """Load a LLaVA (`LlavaForConditionalGeneration`) and its processor with `from_pretrained`.

    model: a hub id (`llava-hf/llava-1.5-7b-hf`; needs network or the Hugging Face cache) or a local directory
        written by `save_pretrained` (for example `<dir>/llava` from `build_tiny_models`).
    dtype: `float32`, `bfloat16`, `float16`, or `auto` (the checkpoint's dtype).
    device: where the whole model goes when `device_map` is empty; weights are loaded straight onto it.
    device_map: passed through to `from_pretrained` (accelerate): `"auto"` spreads a model that does not fit
        one device over the GPUs, then CPU memory, then disk offload; `device` is then ignored.
    trust_remote_code: passed through; LLaVA needs no remote code, and the project keeps it off.

    Returns `(model, processor)`: the model in eval mode, the processor's tokenizer padding on the left so
    `model.generate(**processor(images=..., text=[...], padding=True, return_tensors="pt"))` works on batches.
    Raises `ModelLoadError` (one line naming `model`) when the directory is missing or the hub is unreachable.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = str(model)
    local = looks_like_local_path(model)
    if local:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"LLaVA model {model!r}: local directory not found; {_HINT}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"LLaVA model {model!r}: the directory has no config.json (not a save_pretrained directory); {_HINT}"
            )
        source = str(path)
    else:
        source = model
    placement = device_map if device_map else {"": str(torch.device(device))}
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        # The model first: a missing hub id then fails on its config, before the processor's several files.
        llava = LlavaForConditionalGeneration.from_pretrained(
            source, dtype=DTYPES[dtype], device_map=placement, **kwargs
        )
        processor = AutoProcessor.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unpickling, safetensors, zip and config errors share no base
        if local:
            culprit = unloadable_weights(path)
            if culprit:
                raise ModelLoadError(f"LLaVA model {model!r}: {culprit}; replace the file (or the directory)") from None
        where = "local directory" if local else "hub id"
        reason = _first_line(exc)
        raise ModelLoadError(f"LLaVA model {model!r} ({where}) could not be loaded ({reason}); {_HINT}") from None
    llava.eval()
    _complete_processor(processor, llava)
    check_processor_geometry(processor, llava, model)
    return llava, processor


def _processor_side(image_processor) -> tuple[int, int] | None:
    """The ``(height, width)`` of the pixels the image processor hands the tower (its centre crop, else its
    fixed resize), or None where it does not fix one."""
    for key, on in (("crop_size", "do_center_crop"), ("size", "do_resize")):
        size = getattr(image_processor, key, None)
        if not getattr(image_processor, on, False) or size is None:
            continue
        size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
    return None


def check_processor_geometry(processor, model, name: str) -> None:
    """Refuse a processor whose images or ``<image>`` expansion disagree with the model's vision tower
    (ModelLoadError, one line naming both shapes): a crop other than the tower's input side fails in the
    tower's patch embedding, a patch size other than the tower's gives a prompt whose image-token count
    differs from the visual tokens, both only at the first batch otherwise."""
    tokens, grid_h, grid_w, _ = vision_grid(model)
    vc = model.config.vision_config
    tower = (vc.image_size, vc.image_size) if isinstance(vc.image_size, int) else tuple(vc.image_size)
    side = _processor_side(getattr(processor, "image_processor", None))
    if side is not None and side != tower:
        raise ModelLoadError(
            f"LLaVA model {name!r}: the processor makes {side[0]}x{side[1]} images but the vision "
            f"tower takes {tower[0]}x{tower[1]} (preprocessor crop_size/size against "
            f"vision_config.image_size); use the processor saved with the model"
        )
    patch = getattr(processor, "patch_size", None)
    if side is None or not patch:
        return
    extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    expanded = (side[0] // patch) * (side[1] // patch) + extra
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        expanded -= 1
    if expanded != tokens:
        raise ModelLoadError(
            f"LLaVA model {name!r}: the processor expands <image> to {expanded} tokens "
            f"({side[0] // patch}x{side[1] // patch} patches of {patch} px) but the vision tower "
            f"gives {tokens} visual tokens ({grid_h}x{grid_w} patches of {vc.patch_size} px); use "
            f"the processor saved with the model"
        )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LOCAL_DIR_PREFIX = "local-dir:"  # open_clip's name for a model in a local directory


def weights_identity(model: str, pretrained: str = "") -> list[list]:
    """``[path, size, mtime_ns]`` of the weights files a model name points at on disk: a local LLaVA directory
    or open_clip's ``local-dir:DIR``, and a ``pretrained`` checkpoint file; [] for a hub model. A cache keyed
    on it is not reused after the weights are replaced in place."""
    model = str(model)
    local = model[len(LOCAL_DIR_PREFIX) :] if model.startswith(LOCAL_DIR_PREFIX) else model
    folder = Path(local).expanduser()
    files = []
    if (model.startswith(LOCAL_DIR_PREFIX) or looks_like_local_path(local)) and folder.is_dir():
        files = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES)
    if pretrained and Path(pretrained).is_file():
        files.append(Path(pretrained))
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def unloadable_weights(folder: Path) -> str | None:
    """The first weights file in ``folder`` that cannot be read safely, and why (None when all can): a pickle
    holding more than tensors (which ``weights_only`` loading refuses, so it runs nothing), an empty, cut or
    corrupt file. Only asked after a load failed, to name the file in the message."""
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        try:
            if file.name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_slice(key)  # a file cut short has a header pointing past its end
            else:
                torch.load(file, map_location="meta", weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever the file's reader raises
            if file.name.endswith(".safetensors"):
                size = file.stat().st_size
                return f"{file} is {'empty' if size == 0 else 'not a complete safetensors file'} ({_first_line(err)})"
            return f"{file} {unreadable_reason(file, err)}"
    return None


def _complete_processor(processor, model) -> None:
    """Left padding for batched generation; fill image-token settings an old processor config may lack from
    the model config, so the processor expands `<image>` to exactly the model's visual-token count."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    config = model.config
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = config.vision_config.patch_size
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    if getattr(processor, "num_additional_image_tokens", None) in (None, 0) and _has_cls(config):
        processor.num_additional_image_tokens = 1
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _has_cls(config) -> bool:
    # CLIP vision towers (llava-1.5) prepend a CLS token to the patch tokens; SigLIP towers do not.
    return getattr(config.vision_config, "model_type", "") in {"clip_vision_model", "clip"}


def llava_inner(model):
    """The module holding `vision_tower` and `multi_modal_projector` (`model.model` in transformers >= 4.52,
    the model itself before)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "vision_tower"):
        return inner
    return model


def _feature_layers(config) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def vision_grid(model) -> tuple[int, int, int, int]:
    """`(tokens_per_image, grid_h, grid_w, width)` of the visual tokens LLaVA's projector reads.

    grid_h x grid_w is the vision tower's patch grid (image_size // patch_size each way); tokens_per_image is
    the number of tokens after `vision_feature_select_strategy` (`default` drops the first token, the CLS of a
    CLIP tower: grid_h * grid_w; `full` keeps it: grid_h * grid_w + 1), which is also how many `<image>`
    tokens the processor puts in a prompt; width is the vision hidden size (times the number of layers when
    `vision_feature_layer` is a list, as the model concatenates them). The first `grid_h * grid_w` tokens
    after selection are the patches in row-major order when the strategy is `default`; with `full` the CLS
    comes first.
    """
    config = model.config if hasattr(model, "config") else model
    vc = config.vision_config
    size = vc.image_size
    patch = vc.patch_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid_h, grid_w = h // ph, w // pw
    tokens = grid_h * grid_w + (1 if _has_cls(config) else 0)
    if config.vision_feature_select_strategy == "default":
        tokens -= 1
    width = vc.hidden_size * len(_feature_layers(config))
    return tokens, grid_h, grid_w, width


def vision_side(model) -> int:
    """The vision tower's input side in pixels (the larger of an ``(h, w)`` pair): what the processor resizes
    an image's short side to, so what decoding may reduce an image to (:func:`mllmfl_dist.data.images.decode_image`)."""
    config = model.config if hasattr(model, "config") else model
    size = config.vision_config.image_size
    return int(size) if isinstance(size, int) else int(max(size))


def clip_visual_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's features as LLaVA feeds them to its projector: `[B, tokens_per_image, width]`.

    Hidden states of the tower at `config.vision_feature_layer` (concatenated over the layers when it is a
    list), with `config.vision_feature_select_strategy` applied (`default` drops the CLS). This reproduces the
    selection in `LlavaModel.get_image_features`, which in transformers 5 returns only projected features;
    the tests check it equals the projector's input inside the model's own forward. `pixel_values` (from the
    processor) is moved to the tower's device and dtype. Gradients flow if enabled; wrap in `torch.no_grad()`
    for a frozen tower.
    """
    config = model.config
    tower = llava_inner(model).vision_tower
    param = next(tower.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    outputs = tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = [outputs.hidden_states[i] for i in _feature_layers(config)]
    if config.vision_feature_select_strategy == "default":
        hidden = [h[:, 1:] for h in hidden]
    return hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)


def project_visual_tokens(model, features: torch.Tensor) -> torch.Tensor:
    """LLaVA's multimodal projector applied to `[B, tokens, width]` vision features -> `[B, tokens, text_hidden]`
    (the embeddings that replace the `<image>` tokens)."""
    projector = llava_inner(model).multi_modal_projector
    param = next(projector.parameters())
    return projector(features.to(device=param.device, dtype=param.dtype))


def llava_forward_with_visual_features(
    llava,
    visual_features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """LLaVA's forward with ``visual_features`` ``[B, tokens, width]`` (vision-tower space, before the
    projector) in place of what its vision tower would compute.

    As ``LlavaModel.forward``: token embeddings of ``input_ids``, the projector ``W`` of the features scattered
    into the ``<image>`` positions (``masked_scatter``, row-major over the batch), then the language model
    and head on ``inputs_embeds``; with ``labels`` the model's own shifted next-token cross-entropy (mean
    over the positions whose label is not -100). Returns the model's output (``.loss``, ``.logits``).
    """
    inputs_embeds = visual_inputs_embeds(llava, visual_features, input_ids)
    return llava(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask.to(inputs_embeds.device),
        labels=None if labels is None else labels.to(inputs_embeds.device),
    )


def visual_inputs_embeds(llava, visual_features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`[B, L, text_hidden]`: the token embeddings of `input_ids` with the projector `W` of `visual_features`
    (`[B, tokens, width]`, vision-tower space) scattered into the `<image>` positions, as `LlavaModel.forward`
    builds its `inputs_embeds`. Raises ValueError when the image-token count does not match the features."""
    embed = llava.get_input_embeddings()
    inputs_embeds = embed(input_ids.to(embed.weight.device))
    projected = project_visual_tokens(llava, visual_features).to(inputs_embeds.dtype)
    image_token_id = llava.config.image_token_id
    mask = input_ids.to(inputs_embeds.device) == image_token_id
    if int(mask.sum()) != projected.shape[0] * projected.shape[1]:
        raise ValueError(
            f"the prompts hold {int(mask.sum())} image tokens but there are "
            f"{projected.shape[0]} x {projected.shape[1]} visual features; the prompt needs exactly "
            f"one image placeholder, expanded by the processor"
        )
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), projected)
