"""The modelhost broker: routing, queues, scheduling and daemon supervision (Python >= 3.10)."""
