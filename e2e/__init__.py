"""End-to-end tests: several agent processes against loopback Kubernetes and ModelExpress servers."""
