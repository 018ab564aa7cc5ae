"""Built-in filters, one module per theme; importing the package registers them."""

from filters import (  # noqa: F401  (imported to register the plugins)
    conformance,
    labels,
    prefix_affinity,
)
