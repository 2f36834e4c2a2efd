"""Command line: argparse, environment, exit codes; wires concrete clients in."""
