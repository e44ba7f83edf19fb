"""Shared test configuration.

Hypothesis runs derandomized with a modest example count by default (and always under
CI); set OPTAXCLIP_HYPOTHESIS_EXAMPLES to run more, e.g. 2000 before a release.
"""

import os

import hypothesis

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
