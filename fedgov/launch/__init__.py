"""Launchers: simulation and query runs on this machine, and the processes they manage."""
