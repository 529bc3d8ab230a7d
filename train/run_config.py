"""RunConfig: one run's sections, composed by gridtrain.launcher.config from YAML + overrides."""
from dataclasses import dataclass, field

from gridtrain.data.config import DataConfig
from gridtrain.model.config import ModelConfig
from gridtrain.parallel.config import OptimConfig, ParallelConfig
from gridtrain.train.checkpoint.config import CheckpointConfig
from gridtrain.train.config import LoggingConfig, TrainConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
