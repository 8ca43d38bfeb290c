"""The runtime engine (SPINDLE.md section 8): executes a plan on torch.distributed.

``model`` (logical parameters and one operator's maths), ``data`` (synthetic batches),
``reference`` (the single-process ground truth) and ``ddp_baseline`` (plain DDP, what a user
would run today) are the model side; the executor runs a plan's waves with them.  Submodules
are imported explicitly; importing this package imports nothing heavy.
"""
