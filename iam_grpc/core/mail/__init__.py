"""The mail outbox as the rules see it: queueing a notice and sending the queue."""
