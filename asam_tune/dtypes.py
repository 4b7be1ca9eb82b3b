"""The names an ascent dtype may be given by (no imports: the records and the worker share it)."""
from __future__ import annotations

# What a user may write -> the torch dtype's name. The CLI (``--ascent-dtype``), the profile and
# plan records and ``AsyncSAM(ascent_dtype=...)`` all take these.
ASCENT_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                      "half": "float16"}
