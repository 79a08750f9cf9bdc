"""Jobs and events: durable queues (push and pull delivery, retries, dead letters, callbacks)
and a pub/sub event bus, on SQLite, Redis Streams or NATS JetStream."""
