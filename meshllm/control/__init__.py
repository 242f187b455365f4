"""The local control socket: how CLI commands and local apps talk to a running daemon."""
