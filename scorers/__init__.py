"""Built-in scorers, one module per theme; importing the package registers them."""

from scorers import (  # noqa: F401  (imported to register the plugins)
    active_request,
    context_length,
    load,
    no_hit_lru,
    prefix,
    session_affinity,
)
