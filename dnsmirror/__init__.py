"""dnsmirror: a node-local OCI registry mirror that captures registry names by DNS."""

__version__ = "0.1.0"
