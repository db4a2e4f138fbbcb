"""Adapters that plug gumbel-kernels into other frameworks.

Each submodule imports its framework only when it is imported itself (`import gumbel_kernels`
imports none of them): `gumbel_kernels.integrations.mmdet` registers the GOL losses in
mmdetection 3.x.
"""
