"""Security: api keys, jwt/jwks, rbac and rate limits."""
