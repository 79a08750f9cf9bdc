"""Durable job queues: the backend contract, its three backends, delivery and retries."""
