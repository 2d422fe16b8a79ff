"""FL models. Each exposes its feature map, pooled feature and classifier separately, because the
pretraining stage reads the feature map and the alignment and CReFF-style stages read the pooled feature."""

from mllmfl_dist.models.fl_models import FLModel, ResNet8, ResNet50, build_model

__all__ = ["FLModel", "ResNet8", "ResNet50", "build_model"]
