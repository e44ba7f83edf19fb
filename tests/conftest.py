"""Shared test configuration.

Hypothesis runs derandomized with a modest example count by default (and always under
CI); set OPTAXCLIP_HYPOTHESIS_EXAMPLES to run more, e.g. 2000 before a release.

XLA:CPU generates code at its lowest effort in the test processes (and the notebooks'
kernels they start): compiling is most of the suite's time, and the flags change no HLO
pass, so no result or compiled figure a test reads (tests/test_conformance.py took 24%
less time). Set OPTAXCLIP_FULL_CODEGEN=1 to test with XLA's default code generation.
The README's and guides' blocks always run with it, as a reader runs them.
"""

import os

import hypothesis
from _devices import CHEAP_CODEGEN_FLAGS

if not os.environ.get("OPTAXCLIP_FULL_CODEGEN"):
    # Read when JAX starts its CPU backend, after this file is imported.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_CODEGEN_FLAGS}".strip()

_EXAMPLES = int(os.environ.get("OPTAXCLIP_HYPOTHESIS_EXAMPLES", "25"))

hypothesis.settings.register_profile(
    "optaxclip",
    max_examples=_EXAMPLES,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile("optaxclip")
