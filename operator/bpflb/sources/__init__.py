"""Where cluster state comes from: a directory of Kubernetes YAML, or list+watch of the Kubernetes API, behind one interface."""
