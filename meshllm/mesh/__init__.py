"""The mesh: identity, admission, transports, membership and leader election."""
