"""Asynchronous SAM inside the trainers people already use, with their code unchanged.

``lightning.AsyncSAMCallback`` (PyTorch Lightning), ``transformers.AsyncSAMCallback`` (the
Hugging Face ``Trainer``) and ``ray.placement`` (Ray Train). Each module imports its framework
and names the extra to install when it is missing.
"""
