"""The request path: request → plan → prompt → backend stream → transformers → response."""
