"""The built-in runtimes' names, for the modules that implement them (``dqnc.tflm``,
``dqnc.cpolicy``) and for code that addresses one runtime on purpose (export verifies on TFLM).
Everything that lists runtimes reads the registry (:func:`dqnc.runtimes.names`) instead."""

LITERT = "litert"
TFLITE_RUNTIME = "tflite-runtime"
TFLM = "tflm"
C = "c"

