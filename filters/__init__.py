"""Built-in filters, one module per theme. Registered by type name in
epp/framework/registry.py (BUILTINS); nothing imports them but that table."""
