"""The runtime engine (docs/method.md section 8): executes a plan on torch.distributed.

``config`` (the run's settings), ``localise`` (which modules and rows a rank holds),
``transmission`` (activations and gradients between waves), ``param_groups`` (the device
groups' gradient sync, the global norm), ``executor`` (one iteration, and a whole run on one
rank), ``metrics``; ``data`` (synthetic batches), ``reference`` (the single-process ground truth)
and ``ddp_baseline`` (plain DDP, what a user would run today).  It reads the plan and the
workload's layer provider, never the planner.  Submodules are imported explicitly.
"""
