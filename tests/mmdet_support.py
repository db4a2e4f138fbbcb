"""mmdetection 3.x in tests (shared by the mmdet adapter and checkpoint converter tests).

mmcv-lite has no compiled ops (`mmcv._ext`), and they cannot be built here: `mmdet_modules()`
registers a stand-in `mmcv._ext` before mmdet.models is imported, whose `nms` is
torchvision.ops.nms (what multiclass_nms needs at inference) and whose every other op raises.
Without mmdet the tests skip; `make test` installs it and sets GUMBEL_REQUIRE_MMDET=1, which
turns a skip into a failure.
"""
import contextlib
import importlib
import os
import sys
import types

import pytest
import torchvision


class _MMCVExtStandIn(types.ModuleType):
    """mmcv._ext for tests: nms by torchvision, any other compiled op raises when called."""

    @staticmethod
    def nms(bboxes, scores, iou_threshold, offset=0):
        if offset != 0:
            raise NotImplementedError("the mmcv._ext stand-in's nms supports offset=0 only")
        return torchvision.ops.nms(bboxes, scores, float(iou_threshold))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name}: compiled mmcv ops are not available "
                                      f"in these tests (only nms has a stand-in)")
        return missing


def require(module: str):
    """The module, or a skip (a failure under GUMBEL_REQUIRE_MMDET=1) when it cannot import."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("GUMBEL_REQUIRE_MMDET") == "1":
            raise
        pytest.skip(f"{module} is not importable ({e}); `make test` installs mmdet 3.3, "
                    f"mmengine and mmcv-lite")


@contextlib.contextmanager
def mmdet_modules():
    """The adapter and mmdet's registry, with the mmcv._ext stand-in where mmcv has no ops."""
    require("mmdet")
    try:
        importlib.import_module("mmcv._ext")  # a full mmcv: use its real ops
        stand_in = False
    except ImportError:
        sys.modules["mmcv._ext"] = _MMCVExtStandIn("mmcv._ext")
        stand_in = True
    adapter = importlib.import_module("gumbel_kernels.integrations.mmdet")
    from mmdet.registry import MODELS
    try:
        yield types.SimpleNamespace(adapter=adapter, MODELS=MODELS)
    finally:
        if stand_in:  # there was no mmcv._ext to restore: the import above would have found it
            sys.modules.pop("mmcv._ext", None)
