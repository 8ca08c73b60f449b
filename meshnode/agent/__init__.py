"""meshnode.agent."""
