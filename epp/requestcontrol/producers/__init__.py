"""Data producers: plugins that compute per-request data in PrepareData and publish it
under a typed key (epp/framework/datakeys.py) for filters, scorers and other producers to
read, so no consumer imports its producer: approx-prefix-cache-producer (prefix.py; its
index and block hashing are prefix_index.py and prefix_blocks.py) publishes the prefix cache
match, inflight-load-producer (inflight.py) the requests and tokens in flight per endpoint,
token-producer (tokens.py) the prompt's token count, session-id-producer (session.py) the
session id. A consumer names the instance it reads (`...ProducerName`); the config loader
adds the default producer when the one it reads is not configured, as the reference does.
latency/ is the latency model's library (issue 13)."""
