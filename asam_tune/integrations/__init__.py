"""Asynchronous SAM inside the trainers people already use, with their code unchanged.

``asam_tune.integrations.lightning.AsyncSAMCallback`` for PyTorch Lightning. Each module
imports its framework on import and names the extra to install when it is missing.
"""
