"""The model family: one Q-network description (:class:`QNetSpec`) for MLPs and conv nets.

An MLP is a spec with no conv layers; ``spec.family`` ("mlp" or "conv") is the one predicate,
and ``spec.supports(feature)`` / ``spec.refusal(feature)`` say which stages, prune structures
and runtimes apply. Builders (:mod:`.keras_build`), the numpy forward (:mod:`.forward`),
effective weights (:mod:`.weights`), exact folds (:mod:`.fold`) and the TF-free sidecar files
(:mod:`.sidecar`) all read the spec. Nothing here imports TensorFlow at module level.
"""

from dqnc.qnet.layout import LAYOUTS
from dqnc.qnet.spec import FAMILIES, FEATURES, QNetSpec

__all__ = ["FAMILIES", "FEATURES", "LAYOUTS", "QNetSpec"]
