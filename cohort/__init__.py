"""cohort: deep region features and defensible statistics for CT cohorts."""

import os

__version__ = "0.1.0"

# Ray 2.60 starts local instances with token authentication, and a client sends
# its token only when RAY_AUTH_MODE=token is set before ray is first imported.
# cohort takes the secure default; RAY_AUTH_MODE=disabled in the environment
# still wins (for clusters that run without authentication).
os.environ.setdefault("RAY_AUTH_MODE", "token")
