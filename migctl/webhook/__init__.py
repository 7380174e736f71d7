"""`migctl-webhook`: GitHub's webhook deliveries, verified and deduplicated, onto the job topic."""
