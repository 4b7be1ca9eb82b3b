"""The ``asam-tune`` command line."""
