"""Access tokens, the revocation deny-lists, and sessions with their refresh tokens."""
