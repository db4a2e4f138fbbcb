"""Long-tailed image classification with decoupled classifier re-training (GOL Table 4).

- cifar_lt: CIFAR-100-LT from a local torchvision-format copy, and a generated stand-in
  (`SyntheticLTClassification`), with the many/medium/few class groups.
- models: CIFAR ResNets (ResNet-32 by default).
- train_lt: stage 1 (softmax) + stage 2 (frozen backbone, classifier re-trained with Gumbel BCE
  or softmax); `python -m gumbel_kernels.classification.train_lt --help`.
"""
from .cifar_lt import (GROUPS, LTClassificationData, SyntheticLTClassification, class_groups,
                       cifar100_available, load_cifar100_lt, long_tail_counts, long_tail_indices)
from .models import CifarResNet, resnet_cifar

__all__ = ["GROUPS", "LTClassificationData", "SyntheticLTClassification", "class_groups",
           "cifar100_available", "load_cifar100_lt", "long_tail_counts", "long_tail_indices",
           "CifarResNet", "resnet_cifar"]
