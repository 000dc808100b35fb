"""Model loading and the one-trunk roles (policy, reference, value, reward)."""
