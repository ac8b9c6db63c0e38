"""Push delivery of events (api.md EventService): signed webhooks and NATS JetStream."""
