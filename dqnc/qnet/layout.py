"""The vocabulary every qnet module shares (a leaf: it imports nothing from dqnc)."""

from __future__ import annotations

LAYOUTS = ("HWC", "CHW")  # image layouts a conv net reads; an MLP reads "flat" vectors
ACTIVATIONS = ("relu", "tanh", "elu", "sigmoid", "linear")


def to_hwc(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    """The (height, width, channels) of an observation shape given in ``layout``."""
    if layout == "CHW":
        return (int(shape[1]), int(shape[2]), int(shape[0]))
    return (int(shape[0]), int(shape[1]), int(shape[2]))
