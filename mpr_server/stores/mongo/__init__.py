"""MongoDB: the cold tier of the Redis store."""
