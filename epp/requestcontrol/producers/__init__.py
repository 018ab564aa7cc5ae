"""Data producers: plugins that compute per-request data in PrepareData and publish it
under a typed key (epp/framework/datakeys.py) for filters, scorers and deciders to read,
so no consumer imports its producer. approx-prefix-cache-producer (prefix.py) publishes
the prefix cache match; its index and block hashing are prefix_index.py and
prefix_blocks.py."""
