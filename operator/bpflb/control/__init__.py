"""The Kubernetes control plane: the kopf operator, its admission webhook, the ModuleConfig status, the agents' objects, per-node reports, and the agent on the API."""
