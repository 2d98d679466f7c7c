"""The model file TorchServe's archive carries: a ResNet-18 with the benchmark's 133 classes.

TorchServe's eager-mode loader imports this file, instantiates its one class with no arguments
and loads the artifact's `model.pt` state_dict into it; it runs in TorchServe's own venv.
"""

from __future__ import annotations

from torchvision.models.resnet import BasicBlock, ResNet

_CLASSES = 133  # bench._serve_fixtures.NUM_CLASSES; this file is imported on its own


class ResNet18Dogs(ResNet):  # type: ignore[misc]
    """torchvision's ResNet-18 layout (the artifact's state_dict keys) with a 133-class head."""

    def __init__(self) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=_CLASSES)
