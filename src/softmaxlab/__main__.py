"""`python -m softmaxlab [overrides]` / `softmaxlab [overrides]`: the Hydra app, and the other
commands (summarize, sync, ui, adopt, promote, serve, team, push, pull): `softmaxlab --help`.
The entry point itself is softmaxlab.cli.main."""

from softmaxlab.cli.main import cli

if __name__ == "__main__":
    cli()
