"""A sweep's jobs before any runs: what each one overrides, how many there are, and that every
one composes into a valid config (checked in the launching process, before the first trains)."""

from __future__ import annotations

import itertools

from omegaconf import DictConfig

from softmaxlab.core import metrics as names
from softmaxlab.core.errors import UserError


def job_config(config: DictConfig):
    """A composed job config (Hydra's own `hydra` node left out) as softmaxlab's Config."""
    from softmaxlab.core.config import to_config

    return to_config({k: v for k, v in config.items() if k != "hydra"})


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides. For the basic sweeper these are exactly its jobs (every
    combination); for a sampling one (Optuna) every choice and both ends of every interval."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    values: dict[str, list[str]] = {}  # the command line wins over a preset's params
    for o in OverridesParser.create().parse_overrides(args):
        key = o.get_key_element()
        if isinstance(o.value(), IntervalSweep):
            values[key] = [repr(o.value().start), repr(o.value().end)]
        elif o.is_sweep_override():
            values[key] = list(o.sweep_string_iterator())
        else:
            values[key] = [o.get_value_element_as_str()]
    return [
        [f"{k}={v}" for k, v in zip(values, combo, strict=True)]
        for combo in itertools.product(*values.values())
    ]


def check_jobs(config: DictConfig) -> None:
    """Compose and validate every job before the first one trains: a bad value or a typo in
    job 5 fails the sweep at once, in one line, and leaves no run behind."""
    from hydra.core.global_hydra import GlobalHydra

    from softmaxlab.core.compose_errors import one_line

    loader = GlobalHydra.instance().config_loader()
    for num, job in enumerate(sweep_jobs(config)):
        where = f"sweep job {num} ({' '.join(job) or 'defaults'})"
        try:
            composed = loader.load_sweep_config(config, job)
        except Exception as err:  # Hydra's composition errors: unknown option, key or type
            text = f"{err}\n{err.__cause__ or ''}"  # Hydra puts the key's details in the cause
            raise UserError(f"{where}: {one_line(text)}; no job was run") from err
        try:
            job_config(composed)
        except UserError as err:
            raise UserError(f"{where}: {err}; no job was run") from err


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will run: Optuna's n_trials, or every combination of the
    basic sweeper's values (sweep_jobs); None if unknown."""
    sweeper = config.hydra.sweeper
    if sweeper.get("n_trials") is not None:
        return int(sweeper.n_trials)
    try:
        return len(sweep_jobs(config))
    except Exception:  # a sweeper or syntax we do not know: no estimate, no k/N lines
        return None


def check_direction(objective: str, direction) -> None:
    """An optimising sweeper (Optuna) must go the objective's way: minimising accuracy, or
    maximising NLL, would search for the worst model."""
    wanted = names.OBJECTIVES[objective]
    if direction is not None and str(direction) != wanted:
        raise UserError(
            f"hydra.sweeper.direction={direction} is not allowed with objective={objective}: "
            f"it must be {wanted}"
        )
