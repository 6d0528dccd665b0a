"""Running Flower's processes for fedgov: the environment they get, and their clean stop."""

from fedgov.runtime.processes import ManagedProcess, flower_bin, flower_env, free_port, kill_tree, wait_healthy

__all__ = ["ManagedProcess", "flower_bin", "flower_env", "free_port", "kill_tree", "wait_healthy"]
