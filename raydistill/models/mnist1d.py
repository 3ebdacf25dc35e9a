"""Networks for MNIST-1D (inputs ``(B, 40)``, 10 classes), after Greydanus (2020).

Paper reference accuracies on the 4000/1000 split: logistic 32%, MLP 68%, CNN 94%, GRU 91%.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CNN1D(nn.Module):
    """The default teacher: four 1-D conv layers (two strided) and a linear head (~20k params)."""

    def __init__(self, in_features: int = 40, num_classes: int = 10, channels: int = 32, kernel_size: int = 5):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(1, channels, kernel_size, padding=pad)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, stride=2, padding=pad)
        self.conv3 = nn.Conv1d(channels, channels, kernel_size, stride=2, padding=pad)
        self.conv4 = nn.Conv1d(channels, channels, 3, padding=1)
        length = in_features
        for _ in range(2):
            length = (length + 2 * pad - kernel_size) // 2 + 1
        self.fc = nn.Linear(channels * length, num_classes)

    def hidden_modules(self) -> list[nn.Module]:
        """Hidden states for distillation: the four conv layers' outputs (pooled over positions by the task)."""
        return [self.conv1, self.conv2, self.conv3, self.conv4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """The default student: ``depth`` hidden ReLU layers of width ``hidden``."""

    def __init__(self, in_features: int = 40, num_classes: int = 10, hidden: int = 256, depth: int = 2):
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError(f"MLP: depth ({depth}) and hidden ({hidden}) must be >= 1")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GRUClassifier(nn.Module):
    def __init__(self, in_features: int = 40, num_classes: int = 10, hidden: int = 64, bidirectional: bool = True):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.fc(out[:, -1])


class Logistic(nn.Module):
    def __init__(self, in_features: int = 40, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
