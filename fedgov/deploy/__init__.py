"""Deployment: a coordinator (SuperLink) and nodes (SuperNodes) as real processes, with TLS
and SuperNode authentication."""
