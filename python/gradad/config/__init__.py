"""Run configuration: every default of a GRAD run in one place, loadable from and dumpable to YAML.

A :class:`Config` groups six sections (``model``, ``train``, ``split``, ``data``, ``eval``,
``bigrid``) and the output folder. Defaults follow the reference code (docs/method.md §2); the
paper's variants are behind switches (``model.fusion='paper'``, ``model.jitter_mode='pixel'``)
and in the ``'grad-paper'`` preset.

Every choice list is read from the module that implements it (the op library, the datasets,
the feature cache, the evaluation protocols, the fusion networks, FBP, the device rules), so
this module holds the defaults and the checks, and never a second copy of a list.

- :func:`load_config` / :func:`dump_config`: YAML files (missing keys take their defaults,
  unknown keys are errors); the dump is atomic.
- :func:`apply_overrides`: ``["train.lr=0.01", "model.fusion=paper"]`` style CLI flags, with
  the value converted to the field's type.
- :data:`PRESETS` / :func:`preset_config`: named starting points.
"""

from .files import apply_overrides, config_from_dict, config_to_dict, config_to_yaml, dump_config, load_config
from .presets import PRESETS, preset_config
from .sections import (
                       ARCHITECTURES,
                       BIGRID_COMBINES,
                       BIGRID_SCHEDULES,
                       DEFAULT_OUTPUT_DIR,
                       SECTIONS,
                       THRESHOLD_QUANTILE,
                       VALIDATION_FRACTION,
                       BiGridConfig,
                       Config,
                       DataConfig,
                       EvalConfig,
                       ModelConfig,
                       SplitConfig,
                       TrainConfig,
)

__all__ = ["ARCHITECTURES", "BIGRID_COMBINES", "BIGRID_SCHEDULES", "DEFAULT_OUTPUT_DIR", "PRESETS", "SECTIONS",
           "THRESHOLD_QUANTILE", "VALIDATION_FRACTION", "BiGridConfig", "Config", "DataConfig", "EvalConfig",
           "ModelConfig", "SplitConfig", "TrainConfig", "apply_overrides", "config_from_dict", "config_to_dict",
           "config_to_yaml", "dump_config", "load_config", "preset_config"]
