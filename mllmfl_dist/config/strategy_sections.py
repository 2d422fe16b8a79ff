"""The config sections of the built-in strategies (``[creff]``, ``[clip2fl]``, ``[fedopt]``, ``[feddyn]``),
declared here rather than beside the strategies so that loading and checking a config imports no torch: the
strategy registry (:mod:`mllmfl_dist.config.plugins`) names these dataclasses without importing the strategies.
A plugin's sections live with the plugin."""

from __future__ import annotations

from dataclasses import dataclass

from mllmfl_dist.config.fields import at_least, checked, choice, fraction, non_negative, path_setting, positive

# The operations of Differentiable Siamese Augmentation (mllmfl_dist/fl/strategies/dsa.py), named for
# creff.dsa_strategy.
DSA_OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def dsa_operations(strategy: str) -> tuple[str, ...]:
    """``"color_crop"`` -> ``("color", "crop")``; ``"none"`` or ``""`` -> ``()``."""
    if strategy.strip().lower() in ("", "none"):
        return ()
    return tuple(strategy.strip().split("_"))


@dataclass(frozen=True)
class CreffConfig:
    """``[creff]``: classifier re-training with federated features (strategies creff and clip2fl)."""

    batch_size: int = at_least(32, 1)  # real samples per class-gradient batch on a client (CReFF's batch_real)
    batches_per_class: int = at_least(10, 1)  # batches per class a client averages its class gradient over
    # Differentiable Siamese Augmentation of each of those batches, as released: one of these '_'-separated
    # operations per batch, the same parameters for every image of the batch ("none": no augmentation).
    dsa_strategy: str = checked(
        "color_crop_cutout_flip_scale_rotate",
        lambda v: all(op in DSA_OPERATIONS for op in dsa_operations(v)),
        f"'none' or operations from {', '.join(DSA_OPERATIONS)} joined by '_'",
    )
    # The server's mean of a class's gradients over the clients holding it: "clients" (each counts once, as
    # in the released code) or "samples" (weighted by the client's count of the class)
    gradient_mean: str = choice("clients", ("clients", "samples"))
    features_per_class: int = at_least(100, 1)
    match_epochs: int = at_least(100, 0)  # server steps of gradient matching per round
    lr_feature: float = positive(0.1)
    crt_epochs: int = at_least(300, 1)  # epochs of the fresh classifier over the federated features
    lr_crt: float = positive(0.01)
    crt_batch_size: int = at_least(32, 1)


@dataclass(frozen=True)
class Clip2flConfig:
    """``[clip2fl]``: distillation from a frozen open_clip model on the clients, CLIP text embeddings on the
    server (with ``[creff]`` for the federated features)."""

    model: str = path_setting("")  # open_clip architecture (with pretrained), hf-hub:org/repo or local-dir:DIR
    pretrained: str = path_setting("")  # open_clip pretrained tag for a named architecture (e.g. openai)
    templates: str = "a photo of a {}."  # '|'-separated prompt templates
    # The teacher's logits are scale * cos(image, text): 0 takes the model's own learned scale (exp of its
    # logit_scale), as the released code does through OpenAI's CLIP (whose learned scale is 100); a number > 0
    # overrides it.
    logit_scale: float = non_negative(0.0, "0 (the CLIP model's own learned scale) or a number > 0")
    temperature: float = positive(3.0)  # T of the clients' distillation
    alpha: float = non_negative(1.0)  # weight of alpha * T^2 * KL(teacher || student)
    # Weight of the server's prototype contrast to the text embeddings: 0.001 as in the released code's
    # options.py and README (shijiangming1/CLIP2FL).
    contrast_alpha: float = non_negative(0.001)
    contrast_temperature: float = positive(0.1)
    teacher_batch_size: int = at_least(64, 1)  # images per teacher forward when the logits are first computed
    # Width of the FL model's projection before its classifier (where the federated features live); 0: twice
    # the backbone's pooled feature width, as the released ResNet-8 (add_mlp: 64 * scaling -> 64 * scaling * 2,
    # 256 -> 512, which there equals ViT-B/32's embedding width). Where it differs from the CLIP embedding
    # width, the server's text contrast sees the text embeddings through a fixed, seeded orthonormal map.
    projection_dim: int = at_least(0, 0)


@dataclass(frozen=True)
class FedOptConfig:
    """``[fedopt]``: the adaptive server optimizer of strategies fedadagrad, fedadam and fedyogi (Reddi et al.,
    "Adaptive Federated Optimization", ICLR 2021, Algorithm 2; :mod:`mllmfl_dist.fl.server_optimizers`)."""

    # Server learning rate (the step is federated.server_lr * eta, as server_lr scales every strategy's step).
    # The paper tunes it per task; 0.01 is FedAdam's on CIFAR-10, its image task nearest ours, as Flower's
    # replication of the paper sets it (adap/flower, baselines adaptive_federated_optimization,
    # conf/cifar10/strategy/fedadam.yaml; also Flower's FedYogi default). Chosen without our data.
    eta: float = positive(0.01)
    beta1: float = fraction(0.9)  # first-moment decay: the paper's 0.9, all three optimizers
    beta2: float = fraction(0.99)  # second-moment decay: the paper's 0.99 (fedadam, fedyogi; fedadagrad has none)
    # Adaptivity: the paper's default 1e-3; also v's start (v_{-1} = tau^2, Algorithm 2's lower bound)
    tau: float = positive(1e-3)


@dataclass(frozen=True)
class FedDynConfig:
    """``[feddyn]``: dynamic regularisation (Acar et al., ICLR 2021)."""

    alpha: float = positive(0.01)  # the regulariser's weight; 0.01 as in the paper's experiments
