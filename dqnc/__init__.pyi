# Types of the names dqnc/__init__.py imports on first use (PEP 561 stub for the package module).
from dqnc.api import Evaluation as Evaluation
from dqnc.api import distill as distill
from dqnc.api import evaluate as evaluate
from dqnc.api import export as export
from dqnc.api import load as load
from dqnc.api import prune as prune
from dqnc.api import quantize as quantize
from dqnc.api import run_recipe as run_recipe
from dqnc.api import train as train
from dqnc.artifact import Artifact as Artifact
from dqnc.config import DistillConfig as DistillConfig
from dqnc.config import EvalConfig as EvalConfig
from dqnc.config import ExportConfig as ExportConfig
from dqnc.config import Gates as Gates
from dqnc.config import PruneConfig as PruneConfig
from dqnc.config import QuantizeConfig as QuantizeConfig
from dqnc.config import TrainConfig as TrainConfig
from dqnc.errors import ArtifactError as ArtifactError
from dqnc.errors import ConfigError as ConfigError
from dqnc.errors import DqncError as DqncError
from dqnc.errors import GateFailed as GateFailed
from dqnc.errors import UsageError as UsageError
from dqnc.recipe import RunReport as RunReport

__version__: str
__all__: list[str]
