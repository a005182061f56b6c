"""softmaxlab."""
