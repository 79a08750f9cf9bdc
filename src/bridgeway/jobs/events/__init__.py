"""The event bus: an ordered event log on the jobs backend, subscriptions, webhooks, live streams."""
