"""ResNet-8 (CIFAR-style, width-scaled as in CReFF/FedDF) and ResNet-50 (torchvision, random init)."""

from __future__ import annotations

from typing import cast

import torch
import torchvision
from torch import nn


_HEAD_PREFIXES = ("classifier.", "projection.")


class FLModel(nn.Module):
    """Backbone + linear classifier, with the three views the stages need.

    ``feature_map(x)`` is the last convolutional map [B, map_channels, h, w]; ``pool(map)`` the pooled feature
    [B, feature_dim] (through ``projection`` when the model has one, as CLIP2FL's does); ``classifier``
    the linear head. ``forward`` composes the three.
    """

    feature_dim: int  # width of ``features`` (after the projection, when there is one)
    map_channels: int  # channels of ``feature_map``
    classifier: nn.Linear
    input_memory_format: torch.memory_format = torch.contiguous_format

    def __init__(self) -> None:
        super().__init__()
        self.projection: nn.Module | None = None

    def use_channels_last(self) -> FLModel:
        """NHWC weights and activations: oneDNN (CPU) and cuDNN convolutions run markedly faster."""
        self.to(memory_format=torch.channels_last)
        self.input_memory_format = torch.channels_last
        return self

    def _as_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.input_memory_format)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1)
        return pooled if self.projection is None else self.projection(pooled)

    def add_projection(self, dim: int) -> FLModel:
        """A linear map from the pooled feature to ``dim`` (e.g. the CLIP embedding width) before a new
        classifier: the model's feature is then ``dim`` wide."""
        self.projection = nn.Linear(self.feature_dim, dim)
        self.feature_dim = dim
        self.classifier = nn.Linear(dim, self.classifier.out_features)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.classifier(self.features(x)))

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the head (classifier and projection): what pretraining hands to federated finetuning."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_HEAD_PREFIXES)}

    def load_backbone_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a backbone (head entries in ``state`` are ignored: the task's head stays new)."""
        backbone = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
        missing, unexpected = self.load_state_dict(backbone, strict=False)
        missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
        if missing or unexpected:
            raise ValueError(f"backbone does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet8(FLModel):
    """CIFAR ResNet with one basic block per stage (depth 6n+2, n=1) and widths 16/32/64 x width_scale."""

    def __init__(self, in_channels: int, num_classes: int, width_scale: int = 1):
        super().__init__()
        widths = [16 * width_scale, 32 * width_scale, 64 * width_scale]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = _BasicBlock(widths[0], widths[0], 1)
        self.layer2 = _BasicBlock(widths[0], widths[1], 2)
        self.layer3 = _BasicBlock(widths[1], widths[2], 2)
        self.feature_dim = self.map_channels = widths[2]
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self._as_input(x))))
        return cast(torch.Tensor, self.layer3(self.layer2(self.layer1(x))))


class ResNet50(FLModel):
    """torchvision's ResNet-50, random init, with the stem adapted to any channel count."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.feature_dim = self.map_channels = net.fc.in_features
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.body(self._as_input(x)))


def build_model(
    arch: str, in_channels: int, num_classes: int, width_scale: int = 1, channels_last: bool = False
) -> FLModel:
    if arch == "resnet8":
        model: FLModel = ResNet8(in_channels, num_classes, width_scale)
    elif arch == "resnet50":
        model = ResNet50(in_channels, num_classes)
    else:
        raise ValueError(f"unknown model arch {arch!r}; choose resnet8 or resnet50")
    return model.use_channels_last() if channels_last else model
