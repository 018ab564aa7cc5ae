"""Built-in filters, one module per theme; importing the package registers them."""

from filters import (  # noqa: F401  (imported to register the plugins)
    labels,
    prefix_affinity,
    testing,
)
