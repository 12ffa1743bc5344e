"""The node-local DNS server: captures registry names, forwards everything else."""
