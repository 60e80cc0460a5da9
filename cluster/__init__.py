"""Where work runs and where bytes live: Ray connection, local cluster, storage URIs, job specs."""
import os as _os

# Ray reads its auth mode once, when it is first imported: set it before anything imports ray.
_os.environ.setdefault("RAY_AUTH_MODE", "token")
