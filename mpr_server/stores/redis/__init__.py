"""The Redis store: Redis (hot queues, leases, sessions, notifications) + MongoDB (payloads of old
messages), shared by any number of MPR instances. ``store.py`` is the entry point."""
