"""Profile handlers: which scheduling profiles run for a request, and which result is
primary. single: one profile; disaggregated: decode, then encode and prefill when their
deciders approve (deciders.py, beside their handler); data_parallel: one profile, the
pod's primary port; header: the profile a request header names."""
