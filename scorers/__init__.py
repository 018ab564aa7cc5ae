"""Built-in scorers, one module per theme. Registered by type name in
epp/framework/registry.py (BUILTINS); nothing imports them but that table.

context-length-aware lives here although it can also filter: scoring is what it always
does, filtering is opt-in (enableFiltering), and the reference lists it as a scorer."""
