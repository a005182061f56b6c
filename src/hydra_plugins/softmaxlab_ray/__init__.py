"""softmaxlab's Ray launcher for Hydra (`launcher=ray`): Hydra instantiates launchers only
from the `hydra_plugins` namespace, and only classes its plugin scan found there."""
