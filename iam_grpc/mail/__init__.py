"""Email adapters: templates, SMTP and file transports."""
