"""`softmaxlab adopt`: make params.yaml's values conf/'s defaults.

conf/ is the source of truth and params.yaml its composition. An experiment you keep
(`dvc exp apply`, or `dvc exp run -S` in the workspace) changes params.yaml only; adopting
writes it back into conf/, so the next `dvc exp run -S` starts from it instead of dropping it:

- for each config group, the option closest to params.yaml becomes the default in
  conf/config.yaml (`-S model=wide` adopts as `model: wide`);
- values that still differ are written into that option's file (`optimizer.lr=0.01` into
  conf/optimizer/adam.yaml), and top-level ones (`seed`, `paths`) into conf/config.yaml;
- params.yaml is then recomposed, and must come out unchanged.

Files are edited with ruamel.yaml (DVC's own YAML library), which keeps their comments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from softmaxlab.core.config import compose, leaves, project_root
from softmaxlab.core.errors import UserError

SKIP_GROUPS = ("schema", "sweep", "hydra")


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 110
    y.indent(mapping=2, sequence=4, offset=2)  # conf/'s own layout
    # `sweep: null` stays `null`, not an empty value.
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return y


def _set(doc, dotted: str, value: Any) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    *parents, leaf = dotted.split(".")
    for p in parents:
        if p not in doc:
            doc[p] = CommentedMap()
        doc = doc[p]
    if isinstance(value, list):  # conf/ writes lists in flow style: [12, 8]
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        value = seq
    doc[leaf] = value


def _diff(have: dict, want: dict) -> dict[str, Any]:
    a, b = leaves(have), leaves(want)
    return {k: a.get(k) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def adopt(root: Path | None = None) -> list[str]:
    """Write params.yaml's values into conf/; returns one line per change made."""
    from softmaxlab.core.config import write_params

    root = root or project_root()
    conf, params_path = root / "conf", root / "params.yaml"
    params = OmegaConf.to_container(OmegaConf.load(params_path))
    y = _yaml()
    main_path = conf / "config.yaml"
    main = y.load(main_path)
    defaults = {
        next(iter(entry)): entry
        for entry in main["defaults"]
        if hasattr(entry, "keys") and next(iter(entry)).split(" ")[-1] not in SKIP_GROUPS
    }
    chosen, changes, edits = [], [], {}
    for group, entry in defaults.items():
        if group not in params:
            continue
        current = entry[group]
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        # Fewest differing values wins; the current default wins a tie.
        scored = [
            (
                len(_diff(params[group], OmegaConf.to_container(compose([f"{group}={o}"])[group]))),
                o != current,
                o,
            )
            for o in options
        ]
        best = min(scored)[2]
        if best != current:
            entry[group] = best
            changes.append(f"conf/config.yaml: {group}: {current} -> {best}")
        chosen.append(f"{group}={best}")
    composed = OmegaConf.to_container(compose(chosen))
    for key, value in sorted(_diff(params, composed).items()):
        group, _, rest = key.partition(".")
        if group in defaults and rest:
            option = defaults[group][group]
            path = conf / group / f"{option}.yaml"
            doc = edits.setdefault(path, y.load(path))
            _set(doc, rest, value)
            changes.append(f"conf/{group}/{option}.yaml: {rest}: {leaves(composed).get(key)!r} -> {value!r}")
        else:
            _set(main, key, value)
            changes.append(f"conf/config.yaml: {key}: {leaves(composed).get(key)!r} -> {value!r}")
    if not changes:
        return []
    edits[main_path] = main
    for path, doc in edits.items():
        with open(path, "w", encoding="utf-8") as f:
            y.dump(doc, f)
    left = _diff(params, OmegaConf.to_container(compose()))
    if left:
        raise UserError(
            f"adopt could not express {sorted(left)} in conf/; edit conf/ by hand, then `make params`"
        )
    write_params(params_path)
    return changes


def adopt_cli(args: list[str]) -> None:
    if args:
        raise UserError("usage: softmaxlab adopt   (writes params.yaml's values into conf/)")
    changes = adopt()
    for line in changes:
        print(f"adopt: {line}")
    if changes:
        print("adopt: params.yaml recomposed from conf/ (unchanged values); commit conf/ and params.yaml")
    else:
        print("adopt: params.yaml already equals conf/'s defaults; nothing to do")
