"""dqnc: train a DQN policy and compress it into an edge-deployable TFLite file."""

__version__ = "0.3.0"
