"""`softmaxlab --help`: the commands, conf/'s groups with their options, and examples that work."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT, compose_config, env_with_venv


def help_output(flag: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "softmaxlab", flag], cwd=ROOT, env=env_with_venv(),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout


def test_help_lists_the_commands_groups_and_options_not_hydras_generic_page():
    out = help_output("--help")
    assert out == help_output("-h")
    assert "powered by Hydra" not in out
    for command in ["softmaxlab -m", "softmaxlab summarize SWEEP_ID", "softmaxlab sync", "softmaxlab ui",
                    "softmaxlab adopt", "softmaxlab promote", "softmaxlab serve", "dvc repro"]:  # fmt: skip
        assert command in out, command
    # Every group in conf/ with every option, the default marked; the schema is internal.
    groups = {
        p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in (ROOT / "conf").iterdir() if p.is_dir()
    }
    listed = dict(
        re.findall(r"^  (\w+) +(.+?)(?:   \(.*)?$", out.split("Config groups")[1].split("Any value")[0], re.M)
    )
    assert set(listed) == set(groups)
    for group, options in groups.items():
        assert [o.rstrip("*") for o in listed[group].split(", ")] == options
    assert "seed*" in listed["model"] and "adam*" in listed["optimizer"]
    assert "schema" not in out


def test_the_help_examples_compose():
    out = help_output("--help")
    examples = re.findall(r"^  softmaxlab (\S+=.*)$", out.split("Examples:")[1], re.M)
    assert len(examples) >= 2
    for line in examples:
        args = [a for a in line.split() if a != "-m"]
        # A sweep example's comma lists are several jobs: each of the first values composes.
        compose_config(*(a.split(",")[0] for a in args))
