"""The operator dashboard: static files the agent's admin port serves."""
