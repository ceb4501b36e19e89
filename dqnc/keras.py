"""The one module that imports TensorFlow and Keras.

TFMOT only supports Keras 2, so every model is built with ``tf_keras``. ``TF_USE_LEGACY_KERAS``
must be set before TensorFlow is first imported, which is why nothing else in dqnc imports
``tensorflow`` directly: call :func:`tf` / :func:`keras` instead.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # TFMOT needs Keras 2; never let the env override it
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ INFO..ERROR lines (e.g. cuInit on CPU hosts) are noise in a CLI


def tf() -> ModuleType:
    """Return the ``tensorflow`` module, importing it with dqnc's settings on first use."""
    if "tensorflow" not in sys.modules:
        _import_quietly()
        import tensorflow

        # Python-side TF/Keras chatter (e.g. "compiled metrics have yet to be built") is not for users.
        tensorflow.get_logger().setLevel("ERROR")
    import tensorflow

    return tensorflow


def _import_quietly() -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN, CUDA probes) kept off the terminal.

    Those lines are written by absl before TF_CPP_MIN_LOG_LEVEL applies; they are shown only if
    the import fails, or always with DQNC_TF_LOGS=1.
    """
    from dqnc.runtime import quiet_stderr

    with quiet_stderr():
        import tensorflow  # noqa: F401


def keras() -> ModuleType:
    """Return ``tf_keras`` (Keras 2), the Keras every dqnc model is built with."""
    tf()
    import tf_keras

    return tf_keras


def tfmot() -> ModuleType:
    """Return ``tensorflow_model_optimization`` (after the Keras shim is in place)."""
    keras()
    import tensorflow_model_optimization

    return tensorflow_model_optimization
