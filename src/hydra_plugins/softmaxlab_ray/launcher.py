"""Hydra's Ray launcher (hydra-ray-launcher, the cluster extra) as `launcher=ray` uses it.

One change to the plugin's launch: a job whose Ray worker dies (Ray kills workers when their
node runs short of memory; a node can be lost) fails alone, as a job that fails in Python
does. The plugin gathers every result with one `ray.get` after another, so the first lost
worker would abort the sweep and leave the other jobs' results uncollected and that job's
MLflow run RUNNING. Here the lost job's run ends FAILED, tagged with Ray's reason, it counts
as a failed job in the summary and the exit code, and the other jobs finish.

Hydra's plugin scan imports this module at every start: without the cluster extra (the Ray
launcher plugin is optional) RayLauncher is a plain class, which the scan passes over.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import open_dict

log = logging.getLogger(__name__)


try:
    from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher as PluginRayLauncher
except ImportError:  # no cluster extra
    PluginRayLauncher = None


class RayLauncher(PluginRayLauncher or object):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray

        # As the plugin's _core.launch, up to gathering the results.
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(
            f"Ray Launcher is launching {len(job_overrides)} jobs, sweep output dir: {self.config.hydra.sweep.dir}"
        )
        start_ray(self.ray_cfg.init)  # already started by softmaxlab.sweeps.cluster.prepare_launcher
        launched = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
                ref = launch_job_on_ray(
                    self.hydra_context, self.ray_cfg.remote, sweep_config, self.task_function,
                    Singleton.get_state(),
                )  # fmt: skip
            launched.append((idx, list(overrides), ref))
        results = []
        for idx, overrides, ref in launched:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as err:  # the worker or its node is gone, not Python
                results.append(_lost_job(idx, overrides, err))
        return results


def _lost_job(idx: int, overrides: list[str], err: Exception) -> JobReturn:
    from softmaxlab.core.errors import first_line
    from softmaxlab.sweeps.parent import fail_lost_job

    why = first_line(err)
    shown = " ".join(o for o in filter_overrides(overrides) if not o.startswith(("sweep=", "launcher=")))
    print(f"softmaxlab: error: job {idx} ({shown}): Ray lost its worker: {why}", file=sys.stderr, flush=True)
    fail_lost_job(idx, shown, f"Ray lost its worker: {type(err).__name__}: {why}")
    # Completed with no objective, as a job that fails in Python returns (softmaxlab.cli.app.job).
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    ret.return_value = float("nan")
    return ret
