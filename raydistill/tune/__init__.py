"""Ray Tune search over distillation temperature / alpha / sparsity and the accuracy-compression
Pareto front (``raydistill tune``): ``space`` (search-section schema), ``pareto`` (pure front),
``search`` (resource plan, schedulers, searchers, the Train V2 trial driver), ``runner`` (runs it on
Ray), ``report`` (trials.csv, pareto.json, pareto.png, best_config.yaml), ``cli``."""
