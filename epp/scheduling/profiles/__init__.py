"""Profile handlers: which scheduling profiles run for a request, and which result is
primary. single: one profile; disaggregated: decode, then prefill when a P/D decider
approves (the deciders live beside their handler)."""
